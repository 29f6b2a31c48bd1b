//! Following an S3 listing (ListObjectsV2, ListParts) page by page, with a limit on the pages.
//! The server decides how many pages there are; without a limit a broken or hostile one keeps a
//! reconcile paging for ever. A listing that cannot be followed to its end is an error, never a
//! partial result: callers decide from a listing what is missing (and upload it again) or what
//! to restore, and half a listing would make them act on a wrong picture.

use std::future::Future;

/// One page: its items, whether more follow, and the marker (continuation token, part number
/// marker) to ask for the next one with.
pub struct Page<T> {
    pub items: Vec<T>,
    pub truncated: bool,
    pub next: Option<String>,
}

/// Why a listing could not be followed to its end.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PagingError {
    #[error("the listing goes on past {limit} pages; refusing to act on part of it")]
    TooManyPages { limit: usize },
    #[error("page {page} of the listing says more follow but gives no marker to continue from")]
    NoMarker { page: usize },
    #[error("page {page} of the listing gives the same continuation marker as the page before it")]
    RepeatedMarker { page: usize },
}

/// A failed listing: a page could not be fetched, or the pages could not be followed.
#[derive(Debug)]
pub enum ListingFailure<E> {
    Fetch(E),
    Paging(PagingError),
}

/// Fetches pages with `fetch(marker)` (no marker for the first) until one is not truncated, at
/// most `limit` pages, and returns every item in order.
pub async fn collect_pages<T, E, F, Fut>(limit: usize, mut fetch: F) -> Result<Vec<T>, ListingFailure<E>>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<Page<T>, E>>,
{
    let mut items = Vec::new();
    let mut marker: Option<String> = None;
    for page_number in 1..=limit {
        let page = fetch(marker.clone()).await.map_err(ListingFailure::Fetch)?;
        items.extend(page.items);
        if !page.truncated {
            return Ok(items);
        }
        match page.next {
            None => return Err(ListingFailure::Paging(PagingError::NoMarker { page: page_number })),
            Some(next) if marker.as_ref() == Some(&next) => {
                return Err(ListingFailure::Paging(PagingError::RepeatedMarker { page: page_number }));
            }
            Some(next) => marker = Some(next),
        }
    }
    Err(ListingFailure::Paging(PagingError::TooManyPages { limit }))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A listing of `total` items served `per_page` at a time, markers being item indexes.
    fn source(
        total: usize,
        per_page: usize,
    ) -> impl FnMut(Option<String>) -> std::future::Ready<Result<Page<usize>, String>> {
        move |marker| {
            let start = marker.map_or(0, |m| m.parse::<usize>().unwrap());
            let end = (start + per_page).min(total);
            std::future::ready(Ok(Page {
                items: (start..end).collect(),
                truncated: end < total,
                next: (end < total).then(|| end.to_string()),
            }))
        }
    }

    #[tokio::test]
    async fn a_listing_is_followed_to_its_end() {
        let items = collect_pages(10, source(25, 3)).await.unwrap();
        assert_eq!(items, (0..25).collect::<Vec<_>>());
        // Exactly at the limit is fine.
        assert_eq!(collect_pages(9, source(25, 3)).await.unwrap().len(), 25);
    }

    #[tokio::test]
    async fn a_listing_longer_than_the_limit_is_an_error_not_a_partial_result() {
        let fetched = Mutex::new(0);
        let mut inner = source(1_000_000, 1);
        let counting = |marker| {
            *fetched.lock().unwrap() += 1;
            inner(marker)
        };
        match collect_pages(5, counting).await {
            Err(ListingFailure::Paging(e)) => assert_eq!(e, PagingError::TooManyPages { limit: 5 }),
            other => panic!("expected TooManyPages, got {:?}", other.map(|v| v.len())),
        }
        assert_eq!(*fetched.lock().unwrap(), 5);
    }

    #[tokio::test]
    async fn a_truncated_page_without_a_new_marker_is_an_error() {
        let no_marker =
            |_| std::future::ready(Ok::<_, String>(Page { items: vec![1], truncated: true, next: None }));
        assert!(matches!(
            collect_pages(10, no_marker).await,
            Err(ListingFailure::Paging(PagingError::NoMarker { page: 1 }))
        ));
        let stuck = |_| {
            std::future::ready(Ok::<_, String>(Page {
                items: vec![1],
                truncated: true,
                next: Some("m".into()),
            }))
        };
        assert!(matches!(
            collect_pages(10, stuck).await,
            Err(ListingFailure::Paging(PagingError::RepeatedMarker { page: 2 }))
        ));
    }

    #[tokio::test]
    async fn a_failed_page_fails_the_listing() {
        let failing = |_| std::future::ready(Err::<Page<u8>, _>("HTTP 500".to_string()));
        assert!(matches!(collect_pages(10, failing).await, Err(ListingFailure::Fetch(e)) if e == "HTTP 500"));
    }
}
