//! Renting the machine, with the create-pending gate: the mark is persisted (optimistic lock)
//! before the rent call, and the result (`providerId`, then `create-succeeded`) right after it.
//! A restart that finds a pending mark newer than success looks the instance up by its label
//! instead of renting again: one match is adopted, none is retried after a grace period, several
//! keep the oldest and destroy the rest.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::{Error, kube_err, provider_err, sshkey};
use crate::api::{
    CREATE_PENDING_ANNOTATION, CREATE_SUCCEEDED_ANNOTATION, ConditionStatus, GpuInstance, GpuInstancePhase,
    GpuInstanceStatus, OfferStatus, Reason, instance_condition, set_condition, to_k8s_time,
};
use crate::controller::Context;
use crate::controller::patch::{is_conflict, set_annotations_locked};
use crate::crash::crash_point;
use crate::machine::adopt::{Adopted, adopt_by_label, pending_grace_left};
use crate::machine::decide::{
    PendingCreate, annotation_time, avoided_machines, exclude_machine, pending_create,
};
use crate::machine::instance_label;
use crate::machine::offer::{describe_offer, offer_status};
use crate::machine::onstart;
use crate::machine::rent::{RentFailure, triage_rent_error};
use crate::metrics::OutcomeLabels;
use crate::provider::select::{Criteria, select_offer};
use crate::provider::{Instance, InstanceId, LaunchRequest, Offer, OfferOrder, OfferQuery};

/// Rents a machine for `instance`, or recovers the result of an earlier rent call.
pub async fn ensure_launched(
    api: &Api<GpuInstance>,
    instance: &GpuInstance,
    status: &mut GpuInstanceStatus,
    ctx: &Context,
    now: DateTime<Utc>,
) -> Result<Action, Error> {
    let uid = instance.uid().ok_or(Error::Missing("uid"))?;
    let label = instance_label(&ctx.config.installation_id, &uid);
    status.label = Some(label.clone());
    let annotations = instance.annotations();

    if let PendingCreate::Unresolved { since } = pending_create(
        annotations.get(CREATE_PENDING_ANNOTATION).map(String::as_str),
        annotations.get(CREATE_SUCCEEDED_ANNOTATION).map(String::as_str),
    ) {
        return resolve_pending(api, instance, status, ctx, &label, since, now).await;
    }

    let namespace = instance.namespace().ok_or(Error::Missing("namespace"))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = sshkey::ensure_key(&secrets, instance).await?;
    let env = match resolve_env(&secrets, instance).await {
        Ok(env) => env,
        Err(message) => {
            status.phase = GpuInstancePhase::Failed;
            set_reason(status, Reason::SecretNotFound, &message);
            ctx.event(instance, EventType::Warning, Reason::SecretNotFound, "Launch", message).await;
            return Ok(Action::await_change());
        }
    };

    let mut excluded = status.excluded_machine_ids.clone();
    excluded.extend(avoided_machines(instance));
    let criteria = Criteria::from_requirements(&instance.spec.requirements, &ctx.provider_config, &excluded);
    let offers =
        ctx.provider.search_offers(&query_for(&criteria)).await.map_err(provider_err("search offers"))?;
    let selection = match select_offer(&offers, &criteria) {
        Ok(selection) => selection,
        Err(no_match) => {
            let message = no_match.to_string();
            if status.reason != Some(Reason::NoOffers) {
                ctx.event(instance, EventType::Warning, Reason::NoOffers, "SelectOffer", message.clone())
                    .await;
            }
            status.phase = GpuInstancePhase::Pending;
            set_reason(status, Reason::NoOffers, &message);
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    };
    let offer = selection.offer.clone();

    crash_point("before-pending-mark");
    // The gate: persist the pending mark with the resourceVersion we read. A conflict means
    // someone changed the object (or another replica got here first): start over from a fresh read.
    let marked = match set_annotations_locked(
        api,
        instance,
        &[(CREATE_PENDING_ANNOTATION, Some(annotation_time(now)))],
    )
    .await
    {
        Ok(marked) => marked,
        Err(err) if is_conflict(&err) => return Ok(Action::requeue(Duration::ZERO)),
        Err(err) => return Err(kube_err("persist the create-pending mark")(err)),
    };

    crash_point("after-pending-mark");
    let request = LaunchRequest {
        offer_id: offer.id,
        image: instance.spec.image.clone(),
        disk_gb: instance.spec.requirements.disk_gb.unwrap_or(ctx.provider_config.default_disk_gb),
        env,
        onstart: Some(onstart::render_onstart(
            instance.spec.max_lifetime_seconds,
            instance.spec.onstart.as_deref(),
        )),
        label: Some(label.clone()),
        ssh: true,
        ssh_public_key: Some(key.public_openssh.clone()),
        bid_price_per_hour: None,
    };
    info!(gpuinstance = %instance.name_any(), offer.id = offer.id, offer.gpu = %offer.gpu_name, offer.price = offer.price_per_hour, "Renting");
    match ctx.provider.create_instance(&request).await {
        Ok(id) => {
            crash_point("after-rent");
            ctx.metrics.launches.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
            record_launch(status, id, &offer, now);
            set_reason(
                status,
                Reason::Launched,
                &format!("rented {}: {}", describe_offer(&offer), selection.explanation),
            );
            // Persist the id before anything else can fail, then close the gate.
            super::write_status(api, &marked, &marked.status.clone().unwrap_or_default(), status.clone())
                .await?;
            crash_point("after-recording-id");
            let _ = set_annotations_locked(
                api,
                &fresh(api, &marked).await?,
                &[(CREATE_SUCCEEDED_ANNOTATION, Some(annotation_time(Utc::now())))],
            )
            .await
            .map_err(kube_err("persist the create-succeeded mark"))?;
            if let Some(user_key) = &instance.spec.ssh_public_key {
                ctx.provider
                    .attach_ssh_key(id, user_key)
                    .await
                    .map_err(provider_err("attach the user's SSH key"))?;
            }
            ctx.event(
                instance,
                EventType::Normal,
                Reason::Launched,
                "Launch",
                format!("Rented {} as instance {id}", describe_offer(&offer)),
            )
            .await;
            Ok(Action::requeue(ctx.config.boot_poll))
        }
        Err(err) => {
            ctx.metrics.launches.get_or_create(&OutcomeLabels { outcome: err.category() }).inc();
            match triage_rent_error(&err) {
                RentFailure::LeftContract(contract) => {
                    // The rent failed but billed a contract: destroy it before anything else.
                    ctx.provider
                        .destroy_instance(contract)
                        .await
                        .map_err(provider_err("destroy a contract left by a failed rent"))?;
                    exclude_machine(&mut status.excluded_machine_ids, offer.machine_id);
                    let message = format!(
                        "Renting {} failed and left contract {contract}, which was destroyed; trying another offer",
                        describe_offer(&offer)
                    );
                    ctx.event(instance, EventType::Warning, Reason::BootFailed, "Launch", message).await;
                    clear_pending(api, &marked).await?;
                    Ok(Action::requeue(Duration::ZERO))
                }
                RentFailure::OfferTaken => {
                    let message =
                        format!("Offer {} was taken before we could rent it; choosing another", offer.id);
                    ctx.event(instance, EventType::Normal, Reason::OfferUnavailable, "Launch", message).await;
                    clear_pending(api, &marked).await?;
                    Ok(Action::requeue(Duration::ZERO))
                }
                // The rent may have happened: keep the mark, so the next pass looks by label.
                RentFailure::MaybeRented => Err(provider_err("rent an instance")(err)),
                RentFailure::Refused(reason) => {
                    let message = format!("the provider refused to rent {}: {err}", describe_offer(&offer));
                    ctx.event(instance, EventType::Warning, reason, "Launch", message.clone()).await;
                    clear_pending(api, &marked).await?;
                    status.phase = GpuInstancePhase::Failed;
                    set_reason(status, reason, &message);
                    Ok(Action::await_change())
                }
            }
        }
    }
}

async fn resolve_pending(
    api: &Api<GpuInstance>,
    instance: &GpuInstance,
    status: &mut GpuInstanceStatus,
    ctx: &Context,
    label: &str,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Action, Error> {
    // The rent's answer was lost, and with it possibly the key attachment that follows it.
    let namespace = instance.namespace().ok_or(Error::Missing("namespace"))?;
    let key = sshkey::ensure_key(&Api::namespaced(ctx.client.clone(), &namespace), instance).await?;
    let adopted = adopt_by_label(&*ctx.provider, label, &key.public_openssh)
        .await
        .map_err(|e| Error::Provider { operation: e.operation, source: e.source })?;
    if let Some(Adopted { survivor, destroyed }) = adopted {
        for duplicate in destroyed {
            let message = format!(
                "Destroyed instance {duplicate} carrying this GpuInstance's label; kept the older {}",
                survivor.id
            );
            ctx.event(instance, EventType::Warning, Reason::DuplicateInstanceDestroyed, "Launch", message)
                .await;
        }
        adopt(status, &survivor, now);
        set_reason(
            status,
            Reason::Launched,
            &format!("adopted instance {} found by label after a restart", survivor.id),
        );
        super::write_status(api, instance, &instance.status.clone().unwrap_or_default(), status.clone())
            .await?;
        set_annotations_locked(
            api,
            &fresh(api, instance).await?,
            &[(CREATE_SUCCEEDED_ANNOTATION, Some(annotation_time(Utc::now())))],
        )
        .await
        .map_err(kube_err("persist the create-succeeded mark"))?;
        ctx.event(
            instance,
            EventType::Normal,
            Reason::Launched,
            "Launch",
            format!("Adopted instance {} found by its label", survivor.id),
        )
        .await;
        return Ok(Action::requeue(ctx.config.boot_poll));
    }
    if let Some(left) = pending_grace_left(since, ctx.config.create_pending_grace, now) {
        // The provider's listing lags behind a rent: wait before concluding it never happened.
        status.phase = GpuInstancePhase::Creating;
        set_reason(status, Reason::Launching, "confirming an earlier rent call with the provider");
        return Ok(Action::requeue(left));
    }
    warn!(gpuinstance = %instance.name_any(), "No instance appeared for an unconfirmed rent; renting again");
    clear_pending(api, instance).await?;
    Ok(Action::requeue(Duration::ZERO))
}

async fn fresh(api: &Api<GpuInstance>, instance: &GpuInstance) -> Result<GpuInstance, Error> {
    api.get(&instance.name_any()).await.map_err(kube_err("read the GpuInstance"))
}

async fn clear_pending(api: &Api<GpuInstance>, instance: &GpuInstance) -> Result<(), Error> {
    let current = fresh(api, instance).await?;
    set_annotations_locked(api, &current, &[(CREATE_PENDING_ANNOTATION, None)])
        .await
        .map(|_| ())
        .map_err(kube_err("clear the create-pending mark"))
}

/// The server-side search for the criteria. GPU models, regions and preference are left to
/// [`select_offer`], which understands continent names and fuzzy model names.
pub fn query_for(criteria: &Criteria) -> OfferQuery {
    OfferQuery {
        gpu_names: Vec::new(),
        num_gpus: Some(criteria.num_gpus),
        min_vram_gb: Some(criteria.min_vram_gb),
        max_price_per_hour: Some(criteria.max_price_per_hour),
        min_reliability: Some(criteria.min_reliability),
        verified_only: criteria.verified_only,
        regions: Vec::new(),
        min_disk_gb: Some(criteria.min_disk_gb),
        min_cuda: None,
        min_inet_down_mbps: None,
        order: OfferOrder::PriceAsc,
        limit: Some(200),
    }
}

fn record_launch(status: &mut GpuInstanceStatus, id: InstanceId, offer: &Offer, now: DateTime<Utc>) {
    status.provider_id = Some(id.to_string());
    status.offer = Some(offer_status(offer));
    status.phase = GpuInstancePhase::Booting;
    status.launched_at = Some(to_k8s_time(now));
    set_condition(
        &mut status.conditions,
        instance_condition::LAUNCHED,
        ConditionStatus::True,
        Reason::Launched,
        format!("instance {id}"),
        None,
        now,
    );
}

fn adopt(status: &mut GpuInstanceStatus, instance: &Instance, now: DateTime<Utc>) {
    status.provider_id = Some(instance.id.to_string());
    status.phase = GpuInstancePhase::Booting;
    status.launched_at = Some(to_k8s_time(instance.started_at.unwrap_or(now)));
    if status.offer.is_none() {
        status.offer = Some(OfferStatus {
            id: 0,
            machine_id: instance.machine_id.unwrap_or_default(),
            gpu_name: instance.gpu_name.clone().unwrap_or_default(),
            num_gpus: instance.num_gpus.unwrap_or(1),
            vram_gb: instance.vram_gb.unwrap_or_default(),
            price_per_hour: instance.price_per_hour.unwrap_or_default(),
            reliability: instance.reliability.unwrap_or_default(),
            geolocation: instance.geolocation.clone(),
        });
    }
    set_condition(
        &mut status.conditions,
        instance_condition::LAUNCHED,
        ConditionStatus::True,
        Reason::Launched,
        format!("instance {} (adopted)", instance.id),
        None,
        now,
    );
}

pub(crate) fn set_reason(status: &mut GpuInstanceStatus, reason: Reason, message: &str) {
    status.reason = Some(reason);
    status.message = Some(message.to_string());
}

/// Resolves the container environment; values from Secrets are read now and never written into
/// any Kubernetes object. Returns a message naming the missing Secret or key.
async fn resolve_env(
    secrets: &Api<Secret>,
    instance: &GpuInstance,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for var in &instance.spec.env {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => {
                let r = &from.secret_key_ref;
                let secret = secrets
                    .get_opt(&r.name)
                    .await
                    .map_err(|e| format!("spec.env[{}]: cannot read Secret {}: {e}", var.name, r.name))?
                    .ok_or_else(|| format!("spec.env[{}]: Secret {} does not exist", var.name, r.name))?;
                let bytes = secret.data.as_ref().and_then(|d| d.get(&r.key)).ok_or_else(|| {
                    format!("spec.env[{}]: Secret {} has no key {}", var.name, r.name, r.key)
                })?;
                String::from_utf8(bytes.0.clone()).map_err(|_| {
                    format!("spec.env[{}]: Secret {} key {} is not UTF-8", var.name, r.name, r.key)
                })?
            }
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    Ok(env)
}
