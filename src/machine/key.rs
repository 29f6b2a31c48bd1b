//! The SSH key a machine is rented with: generated per machine (or per job), its public half
//! given to the provider at rent, its private half kept by whoever rented it.

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{LineEnding, PrivateKey};

#[derive(Debug, thiserror::Error)]
#[error("failed to generate an SSH key")]
pub struct GenerateKeyError;

/// A fresh ed25519 key pair in OpenSSH format: (private, public).
pub fn generate_key(comment: &str) -> Result<(String, String), GenerateKeyError> {
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    let private = key.to_openssh(LineEnding::LF).map_err(|_| GenerateKeyError)?.to_string();
    let public = key.public_key().to_openssh().map_err(|_| GenerateKeyError)?;
    Ok((private, public))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_ed25519_pairs() {
        let (private_a, public_a) = generate_key("a").unwrap();
        let (_, public_b) = generate_key("b").unwrap();
        assert_ne!(public_a, public_b);
        assert!(public_a.starts_with("ssh-ed25519 "));
        let parsed = PrivateKey::from_openssh(&private_a).unwrap();
        assert_eq!(parsed.public_key().to_openssh().unwrap(), public_a);
    }
}
