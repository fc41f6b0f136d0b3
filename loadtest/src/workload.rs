//! What requests a load test sends: prompt and output lengths from a distribution, or prompts
//! from a JSONL dataset.

use std::path::Path;
use std::str::FromStr;

use rand::Rng;
use rand::rngs::StdRng;
use serde::Deserialize;

use crate::LoadtestError;

/// A length: fixed (`128`) or uniform over an inclusive range (`64:256`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Length {
    Fixed(u32),
    Uniform(u32, u32),
}

impl FromStr for Length {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("expected a length like `128` or `64:256`, got {s:?}"))
        };
        let l = match s.split_once(':') {
            Some((a, b)) => {
                let (a, b) = (parse(a)?, parse(b)?);
                if a > b {
                    return Err(format!("range {s:?} has its bounds reversed"));
                }
                Length::Uniform(a, b)
            }
            None => Length::Fixed(parse(s)?),
        };
        if l.min() == 0 {
            return Err(format!("lengths must be >= 1, got {s:?}"));
        }
        Ok(l)
    }
}

impl Length {
    pub fn min(&self) -> u32 {
        match *self {
            Length::Fixed(n) | Length::Uniform(n, _) => n,
        }
    }

    pub fn max(&self) -> u32 {
        match *self {
            Length::Fixed(n) | Length::Uniform(_, n) => n,
        }
    }

    pub fn sample(&self, rng: &mut StdRng) -> u32 {
        match *self {
            Length::Fixed(n) => n,
            Length::Uniform(a, b) => rng.random_range(a..=b),
        }
    }
}

/// One line of a JSONL dataset: a text prompt or token ids, and optionally its output length.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetLine {
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub prompt_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

/// A prompt to send.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptSpec {
    Ids(Vec<u32>),
    Text(String),
}

/// One request of the workload.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkItem {
    pub prompt: PromptSpec,
    pub max_tokens: u32,
}

/// Where requests come from.
#[derive(Clone, Debug)]
pub enum Workload {
    /// Random token ids (in `[2, vocab)`) of the given lengths.
    Synthetic {
        prompt_len: Length,
        output_len: Length,
        vocab: u32,
    },
    /// Prompts from a dataset, cycled; lines without `max_tokens` take `output_len`.
    Dataset {
        lines: Vec<DatasetLine>,
        output_len: Length,
    },
}

impl Workload {
    /// Reads a JSONL dataset; errors name the line.
    pub fn read_dataset(path: &Path, output_len: Length) -> Result<Workload, LoadtestError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LoadtestError::Input(format!("reading {}: {e}", path.display())))?;
        let mut lines = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let l: DatasetLine = serde_json::from_str(line).map_err(|e| {
                LoadtestError::Input(format!("{} line {}: {e}", path.display(), i + 1))
            })?;
            match (&l.prompt, &l.prompt_ids) {
                (Some(_), None) | (None, Some(_)) => lines.push(l),
                _ => {
                    return Err(LoadtestError::Input(format!(
                        "{} line {}: give exactly one of `prompt` and `prompt_ids`",
                        path.display(),
                        i + 1
                    )));
                }
            }
        }
        if lines.is_empty() {
            return Err(LoadtestError::Input(format!(
                "{} has no prompts",
                path.display()
            )));
        }
        Ok(Workload::Dataset { lines, output_len })
    }

    /// The `i`-th request.
    pub fn item(&self, i: usize, rng: &mut StdRng) -> WorkItem {
        match self {
            Workload::Synthetic {
                prompt_len,
                output_len,
                vocab,
            } => {
                let n = prompt_len.sample(rng);
                let hi = (*vocab).max(3);
                WorkItem {
                    prompt: PromptSpec::Ids((0..n).map(|_| rng.random_range(2..hi)).collect()),
                    max_tokens: output_len.sample(rng),
                }
            }
            Workload::Dataset { lines, output_len } => {
                let l = &lines[i % lines.len()];
                let prompt = match (&l.prompt, &l.prompt_ids) {
                    (_, Some(ids)) => PromptSpec::Ids(ids.clone()),
                    (Some(t), None) => PromptSpec::Text(t.clone()),
                    (None, None) => PromptSpec::Text(String::new()),
                };
                WorkItem {
                    prompt,
                    max_tokens: l.max_tokens.unwrap_or_else(|| output_len.sample(rng)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn lengths_parse_fixed_and_ranges() {
        assert_eq!("128".parse::<Length>(), Ok(Length::Fixed(128)));
        assert_eq!("64:256".parse::<Length>(), Ok(Length::Uniform(64, 256)));
        assert!("0".parse::<Length>().is_err());
        assert!("9:3".parse::<Length>().unwrap_err().contains("reversed"));
        assert!("x".parse::<Length>().unwrap_err().contains("\"x\""));
        let mut rng = StdRng::seed_from_u64(1);
        let l = Length::Uniform(3, 5);
        assert!(
            (0..100)
                .map(|_| l.sample(&mut rng))
                .all(|n| (3..=5).contains(&n))
        );
    }

    #[test]
    fn datasets_cycle_and_name_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"hi\"}\n\n{\"prompt_ids\": [5, 6], \"max_tokens\": 3}\n",
        )
        .unwrap();
        let w = Workload::read_dataset(&p, Length::Fixed(9)).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(w.item(0, &mut rng).prompt, PromptSpec::Text("hi".into()));
        assert_eq!(w.item(0, &mut rng).max_tokens, 9);
        assert_eq!(w.item(3, &mut rng).max_tokens, 3);
        std::fs::write(&p, "{\"prompt\": \"a\"}\n{\"text\": 1}\n").unwrap();
        let err = Workload::read_dataset(&p, Length::Fixed(9))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
