//! Identifiers. Text everywhere (portable across SQLite and Postgres),
//! prefixed and sortable where the contract lets us choose the format.

use rand::Rng;
use std::fmt;

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    };
}

text_id!(
    /// `acc_` + ULID.
    AccountId
);
text_id!(
    /// `job_` + 26-char ULID (contract §1.7).
    JobId
);
text_id!(
    /// 16 lowercase base32 characters (contract §1.7).
    ProjectId
);
text_id!(
    /// UUID v4 (contract §1.7).
    FileId
);

impl AccountId {
    pub fn generate() -> Self {
        Self(format!("acc_{}", ulid::Ulid::new()))
    }
}

impl JobId {
    pub fn generate() -> Self {
        Self(format!("job_{}", ulid::Ulid::new()))
    }
}

impl ProjectId {
    pub fn generate() -> Self {
        Self(base32_lower(16))
    }
}

impl FileId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// `n` random characters of the lowercase RFC 4648 base32 alphabet.
pub fn base32_lower(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(BASE32[rng.random_range(0..BASE32.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_match_the_contract() {
        let job = JobId::generate();
        assert!(job.0.starts_with("job_") && job.0.len() == 30, "{job}");
        let p = ProjectId::generate();
        assert_eq!(p.0.len(), 16);
        assert!(p.0.bytes().all(|b| BASE32.contains(&b)));
        assert_eq!(FileId::generate().0.len(), 36);
        // ULIDs sort by creation time.
        let a = JobId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = JobId::generate();
        assert!(a < b);
    }
}
