//! Message classifiers for the screener: a trait that judges a batch of texts
//! at once, a local word-list classifier (the default, works offline), and an
//! HTTP classifier speaking the OpenAI-compatible moderation API
//! (`POST {base}/v1/moderations`, `{"model", "input": [..]}` →
//! `{"results": [{"flagged", "categories", "category_scores"}]}`), which many
//! hosted and self-hosted moderation models serve.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use serde::Deserialize;

/// The judgement on one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether a moderator should look at it.
    pub flagged: bool,
    /// The most likely category when flagged (e.g. `harassment`).
    pub label: String,
    /// Confidence in thousandths.
    pub score: u16,
}

impl Verdict {
    fn clean() -> Self {
        Verdict {
            flagged: false,
            label: String::new(),
            score: 0,
        }
    }
}

/// Judges texts in batches; answers one verdict per text, in order.
pub trait Classifier: Send + Sync + 'static {
    /// Classify `texts` (at most one screening batch).
    fn classify<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, anyhow::Result<Vec<Verdict>>>;
}

/// A word list: a text is flagged when one of its words (case-folded, letters
/// and digits only) is on the list; the label is the word's category.
#[derive(Debug, Clone)]
pub struct RuleClassifier {
    words: HashMap<String, String>,
}

/// The built-in list: a small, deliberately conservative default. Deployments
/// pass their own with `MATHIA_MODERATION_WORDS` (`category:word,word;…`).
const DEFAULT_WORDS: &str = "spam:viagra,casino,bitcoin-doubler,crypto-giveaway;\
    scam:wire-me,send-pin,mpesa-pin,otp-code;\
    harassment:idiot,moron,loser,scum;\
    violence:kill-you,shoot-you,stab-you";

impl Default for RuleClassifier {
    fn default() -> Self {
        RuleClassifier::parse(DEFAULT_WORDS).expect("the built-in word list parses")
    }
}

impl RuleClassifier {
    /// Parse `category:word,word;category:word`. Words may join several
    /// tokens with `-` (`kill-you` matches "kill you").
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let mut words = HashMap::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (category, list) = part
                .split_once(':')
                .with_context(|| format!("'{part}' is not category:word,word"))?;
            let category = category.trim();
            anyhow::ensure!(!category.is_empty(), "a category name is empty in '{part}'");
            for w in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
                words.insert(normalise(w).join("-"), category.to_owned());
            }
        }
        anyhow::ensure!(!words.is_empty(), "the word list is empty");
        Ok(RuleClassifier { words })
    }

    fn judge(&self, text: &str) -> Verdict {
        let tokens = normalise(text);
        for n in [1, 2, 3] {
            for window in tokens.windows(n) {
                if let Some(label) = self.words.get(&window.join("-")) {
                    return Verdict {
                        flagged: true,
                        label: label.clone(),
                        score: 1000,
                    };
                }
            }
        }
        Verdict::clean()
    }
}

fn normalise(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
        .collect()
}

impl Classifier for RuleClassifier {
    fn classify<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, anyhow::Result<Vec<Verdict>>> {
        Box::pin(async move { Ok(texts.iter().map(|t| self.judge(t)).collect()) })
    }
}

/// The moderation endpoint of an OpenAI-compatible API.
pub struct HttpClassifier {
    client: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
    threshold: f64,
}

impl std::fmt::Debug for HttpClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("HttpClassifier")
            .field("url", &self.url)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ModerationResponse {
    results: Vec<ModerationResult>,
}

#[derive(Deserialize)]
struct ModerationResult {
    flagged: bool,
    #[serde(default)]
    category_scores: HashMap<String, f64>,
}

impl HttpClassifier {
    /// `base_url` without the `/v1/moderations` path; `threshold` (0..1) also
    /// flags a text whose best category score reaches it although the model
    /// did not flag it itself.
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: Option<String>,
        timeout: Duration,
        threshold: f64,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .context("building the moderation HTTP client")?;
        Ok(HttpClassifier {
            client,
            url: format!("{}/v1/moderations", base_url.trim_end_matches('/')),
            model: model.to_owned(),
            api_key,
            threshold,
        })
    }
}

impl Classifier for HttpClassifier {
    fn classify<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, anyhow::Result<Vec<Verdict>>> {
        Box::pin(async move {
            let mut req = self
                .client
                .post(&self.url)
                .json(&serde_json::json!({ "model": self.model, "input": texts }));
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            let resp = req
                .send()
                .await
                .context("calling the moderation API")?
                .error_for_status()
                .context("the moderation API refused the batch")?;
            let body: ModerationResponse = resp
                .json()
                .await
                .context("reading the moderation API's answer")?;
            anyhow::ensure!(
                body.results.len() == texts.len(),
                "the moderation API judged {} of {} texts",
                body.results.len(),
                texts.len()
            );
            Ok(body
                .results
                .into_iter()
                .map(|r| {
                    let best = r
                        .category_scores
                        .into_iter()
                        .max_by(|a, b| a.1.total_cmp(&b.1));
                    let (label, score) = best.unwrap_or_else(|| ("flagged".into(), 1.0));
                    let flagged = r.flagged || score >= self.threshold;
                    Verdict {
                        flagged,
                        label: if flagged { label } else { String::new() },
                        score: (score.clamp(0.0, 1.0) * 1000.0).round() as u16,
                    }
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_word_list_flags_whole_words_and_phrases_only() {
        let c = RuleClassifier::parse("spam:casino; violence:kill-you").unwrap();
        let texts = [
            "Join my CASINO tonight!",
            "occasionally we meet",
            "I will KILL... you",
            "kill the lights, you know",
        ]
        .map(String::from);
        let v = c.classify(&texts).await.unwrap();
        let flagged: Vec<(bool, &str)> = v.iter().map(|v| (v.flagged, v.label.as_str())).collect();
        assert_eq!(
            flagged,
            [(true, "spam"), (false, ""), (true, "violence"), (false, "")]
        );
    }

    #[test]
    fn a_bad_word_list_is_refused_with_its_reason() {
        assert!(RuleClassifier::parse("nocategory").is_err());
        assert!(RuleClassifier::parse(" ; ").is_err());
        assert!(RuleClassifier::default().words.contains_key("casino"));
    }
}
