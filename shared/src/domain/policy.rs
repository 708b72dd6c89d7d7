//! The content policy of generative prompts: prompts may not depict
//! specific real people (contract §3.8). The maintained list of blocked
//! names ships in `blocked-people.txt` next to this file; operators add
//! their own with `content_policy.blocked_terms`. Matching ignores case,
//! accents and punctuation, and only whole words match ("Ken" does not
//! block "Kendall").

use unicode_normalization::UnicodeNormalization;

/// The shipped list, one name per line (`#` starts a comment).
const SHIPPED: &str = include_str!("blocked-people.txt");

/// Terms a prompt may not contain, normalised for matching.
#[derive(Debug, Clone)]
pub struct ContentPolicy {
    /// (normalised with spaces around it, as written in the list)
    terms: Vec<(String, String)>,
}

impl ContentPolicy {
    /// The shipped list plus the operator's `extra` terms.
    pub fn new(extra: &[String]) -> ContentPolicy {
        let mut terms: Vec<(String, String)> = SHIPPED
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .chain(extra.iter().map(|t| t.trim()))
            .filter(|t| !t.is_empty())
            .map(|t| (format!(" {} ", normalise(t)), t.to_string()))
            .filter(|(n, _)| n.trim().len() >= 2)
            .collect();
        terms.sort();
        terms.dedup_by(|a, b| a.0 == b.0);
        ContentPolicy { terms }
    }

    /// The first blocked term `text` contains, as the list writes it.
    pub fn blocked_term(&self, text: &str) -> Option<&str> {
        let hay = format!(" {} ", normalise(text));
        self.terms
            .iter()
            .find(|(n, _)| hay.contains(n.as_str()))
            .map(|(_, t)| t.as_str())
    }

    pub fn len(&self) -> usize {
        self.terms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }
}

impl Default for ContentPolicy {
    fn default() -> ContentPolicy {
        ContentPolicy::new(&[])
    }
}

/// Lower case, accents removed, every run of non-alphanumerics one space.
fn normalise(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s
        .nfkd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
    {
        if c.is_alphanumeric() {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.extend(c.to_lowercase());
        } else {
            space = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_names_match_whatever_the_case_accents_or_punctuation() {
        let p = ContentPolicy::new(&["Jane Operator-Listed".into()]);
        assert!(p.len() > 50, "the shipped list is loaded: {}", p.len());
        assert_eq!(
            p.blocked_term("A portrait of TAYLOR   swift, smiling"),
            Some("Taylor Swift")
        );
        assert_eq!(p.blocked_term("looks like Beyoncé"), Some("Beyonce"));
        assert_eq!(
            p.blocked_term("jane operator listed in a red coat"),
            Some("Jane Operator-Listed")
        );
        assert_eq!(p.blocked_term("a tailor who is swift"), None);
        assert_eq!(p.blocked_term("A 31-year-old woman, freckles"), None);
    }
}
