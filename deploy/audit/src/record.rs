//! What a load client asked for and was told, as it writes it down: the
//! auditor's evidence of which CreateOrder requests were accepted.
//!
//! The record is a file of JSON lines, appended to by each load client
//! process in turn. A client writes an [`Entry::Intent`] *before* it sends
//! a CreateOrder, and an [`Entry::Accepted`] once the service has answered
//! it; a client started after another was killed resends every intent
//! that has no answer, with the same key and the same request. Each line
//! is one `write` to a file opened for appending, so a client killed
//! mid-line leaves at most its last line torn, which reading skips.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One line of the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum Entry {
    /// A CreateOrder about to be sent (and resent, with the same key and
    /// request, until it is answered).
    Intent {
        key: String,
        customer_id: Uuid,
        total_minor: i64,
        currency: String,
        payment_method: String,
        /// The order's lines, as sent: (sku, quantity, unit price).
        lines: Vec<(String, u32, i64)>,
        /// Milliseconds since the Unix epoch.
        at_ms: i64,
    },
    /// A load client started after another sends `key` again: its
    /// predecessor wrote the intent and no answer.
    Resent { key: String, at_ms: i64 },
    /// The service accepted the CreateOrder with `key`: what it answered.
    Accepted {
        key: String,
        order_id: Uuid,
        total_minor: i64,
        currency: String,
        at_ms: i64,
        /// Sends it took this client (more than one: an answer was lost or
        /// a replica was down).
        #[serde(default = "one")]
        attempts: u32,
    },
    /// The service refused the CreateOrder for good (a status that is
    /// not worth retrying).
    Refused {
        key: String,
        code: String,
        message: String,
        at_ms: i64,
    },
    /// A customer's RequestOrderCancellation, and how it was answered (`ok`, or the
    /// status code of a refusal).
    Cancel {
        order_id: Uuid,
        outcome: String,
        at_ms: i64,
    },
    /// An operator's CompensateSaga on the saga of `order_id`, and how it
    /// was answered.
    Compensate {
        order_id: Uuid,
        outcome: String,
        at_ms: i64,
    },
    /// What followed an order held for review: an admin's `approve` or
    /// `decline`, the customer's `cancel` (RequestOrderCancellation while it
    /// waits), or `none` (left to time out); and how it was answered (`ok`,
    /// the status code of a refusal, or why it was not sent).
    Review {
        order_id: Uuid,
        decision: String,
        outcome: String,
        at_ms: i64,
    },
    /// The customer's RequestReturn of a confirmed order, and how it was
    /// answered (or why it was not sent: the order did not confirm).
    Return {
        order_id: Uuid,
        outcome: String,
        at_ms: i64,
    },
}

/// A CreateOrder as it was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub key: String,
    pub customer_id: Uuid,
    pub total_minor: i64,
    pub currency: String,
    pub payment_method: String,
    pub lines: Vec<(String, u32, i64)>,
    pub at_ms: i64,
}

fn one() -> u32 {
    1
}

/// An answer to a CreateOrder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub order_id: Uuid,
    pub total_minor: i64,
    pub currency: String,
    pub at_ms: i64,
    pub attempts: u32,
}

/// The record, read back.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// By idempotency key, the first intent written for it.
    pub intents: BTreeMap<String, Intent>,
    /// Every acceptance of a key (more than one if a client sent it again
    /// before it had written the first answer down).
    pub accepted: HashMap<String, Vec<Answer>>,
    /// Keys refused for good, with the status code.
    pub refused: HashMap<String, String>,
    /// Keys a later load client sent again, with when it first did.
    pub resent: HashMap<String, i64>,
    /// RequestOrderCancellation outcomes, by outcome.
    pub cancels: BTreeMap<String, u64>,
    /// CompensateSaga outcomes, by outcome.
    pub compensations: BTreeMap<String, u64>,
    /// Review decisions, by (decision, outcome).
    pub reviews: BTreeMap<(String, String), u64>,
    /// RequestReturn outcomes, by outcome.
    pub returns: BTreeMap<String, u64>,
    /// Lines that could not be read (a client killed mid-line).
    pub torn_lines: u64,
}

impl Record {
    /// Reads the record at `path`.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the load record {}", path.display()))?;
        Ok(Self::parse(&text))
    }

    /// The record of `text`, one entry a line.
    pub fn parse(text: &str) -> Self {
        let mut record = Self::default();
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            match serde_json::from_str::<Entry>(line) {
                Ok(entry) => record.add(entry),
                Err(_) => record.torn_lines += 1,
            }
        }
        record
    }

    fn add(&mut self, entry: Entry) {
        match entry {
            Entry::Intent {
                key,
                customer_id,
                total_minor,
                currency,
                payment_method,
                lines,
                at_ms,
            } => {
                self.intents.entry(key.clone()).or_insert(Intent {
                    key,
                    customer_id,
                    total_minor,
                    currency,
                    payment_method,
                    lines,
                    at_ms,
                });
            }
            Entry::Resent { key, at_ms } => {
                self.resent.entry(key).or_insert(at_ms);
            }
            Entry::Accepted {
                key,
                order_id,
                total_minor,
                currency,
                at_ms,
                attempts,
            } => self.accepted.entry(key).or_default().push(Answer {
                order_id,
                total_minor,
                currency,
                at_ms,
                attempts,
            }),
            Entry::Refused { key, code, .. } => {
                self.refused.insert(key, code);
            }
            Entry::Cancel { outcome, .. } => *self.cancels.entry(outcome).or_default() += 1,
            Entry::Compensate { outcome, .. } => {
                *self.compensations.entry(outcome).or_default() += 1;
            }
            Entry::Review {
                decision, outcome, ..
            } => *self.reviews.entry((decision, outcome)).or_default() += 1,
            Entry::Return { outcome, .. } => *self.returns.entry(outcome).or_default() += 1,
        }
    }

    /// Intents with neither an answer nor a refusal: a client must send
    /// them again.
    pub fn unanswered(&self) -> impl Iterator<Item = &Intent> {
        self.intents
            .values()
            .filter(|intent| !self.accepted.contains_key(&intent.key))
            .filter(|intent| !self.refused.contains_key(&intent.key))
    }

    /// The customers the record speaks for.
    pub fn customers(&self) -> HashSet<Uuid> {
        self.intents
            .values()
            .map(|intent| intent.customer_id)
            .collect()
    }
}

/// Appends entries to a record file, one `write` per line.
#[derive(Debug)]
pub struct Writer {
    file: std::sync::Mutex<std::fs::File>,
}

impl Writer {
    /// Opens (or creates) the record at `path` for appending.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the load record {}", path.display()))?;
        Ok(Self {
            file: std::sync::Mutex::new(file),
        })
    }

    /// Writes `entry` as one line. It is in the file (the operating
    /// system's) when this returns, so a client killed afterwards does not
    /// lose it.
    pub fn write(&self, entry: &Entry) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(entry).context("encoding a record entry")?;
        line.push(b'\n');
        let mut file = self
            .file
            .lock()
            .map_err(|_| anyhow::anyhow!("the record writer panicked"))?;
        file.write_all(&line)
            .context("appending to the load record")
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_counted_and_skipped() {
        let intent = Entry::Intent {
            key: "k1".into(),
            customer_id: Uuid::nil(),
            total_minor: 2799,
            currency: "EUR".into(),
            payment_method: "tok_visa".into(),
            lines: vec![("BOOK-42".into(), 2, 1300), ("PEN-1".into(), 1, 199)],
            at_ms: 1,
        };
        let mut text = serde_json::to_string(&intent).unwrap();
        text.push('\n');
        text.push_str(r#"{"entry":"accepted","key":"k1","ord"#);
        let record = Record::parse(&text);
        assert_eq!(record.intents.len(), 1);
        assert_eq!(record.torn_lines, 1);
        assert_eq!(record.unanswered().count(), 1);
    }
}
