//! Text in and out: the Hugging Face `tokenizers` crate reading a checkpoint's
//! `tokenizer.json`, chat templates from `tokenizer_config.json` rendered with `minijinja`,
//! incremental detokenization for streaming, and the synthetic byte-level BPE that
//! `switchyard synth` writes so text works end to end on random checkpoints.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use tokenizers::{DecoderWrapper, Tokenizer};

use crate::error::{EngineError, Result};

/// DeepSeek-V3's special tokens, which the synthetic tokenizer reuses.
pub const BOS_TOKEN: &str = "<｜begin▁of▁sentence｜>";
pub const EOS_TOKEN: &str = "<｜end▁of▁sentence｜>";
pub const USER_TOKEN: &str = "<｜User｜>";
pub const ASSISTANT_TOKEN: &str = "<｜Assistant｜>";

/// A chat template in DeepSeek-V3's format (system text, `<｜User｜>` / `<｜Assistant｜>` turns,
/// assistant turns closed by the end-of-sentence token).
pub const SYNTHETIC_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
{% if message['role'] == 'system' %}{{ message['content'] }}\
{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}\
{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}\
{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}";

/// One message of a chat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::input("tokenizer", format!("{what}: {e}"))
}

/// A checkpoint's tokenizer and chat template.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Each id's bytes ([`Self::token_bytes`]), built once at load.
    bytes: Arc<Vec<Box<[u8]>>>,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// Whether `decoder` (or a decoder in its sequence) undoes GPT-2's byte-to-symbol mapping.
fn is_byte_level(decoder: &DecoderWrapper) -> bool {
    match decoder {
        DecoderWrapper::ByteLevel(_) => true,
        DecoderWrapper::Sequence(s) => s.get_decoders().iter().any(is_byte_level),
        _ => false,
    }
}

/// GPT-2's byte-level alphabet reversed: the symbol each byte is written as, to the byte.
fn byte_level_symbols() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        let c = if printable {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, b);
    }
    map
}

/// Every id's bytes, as [`TextTokenizer::token_bytes`] returns them.
fn token_bytes_table(inner: &Tokenizer) -> Vec<Box<[u8]>> {
    let byte_level = inner.get_decoder().is_some_and(is_byte_level);
    let symbols = byte_level_symbols();
    let special: HashSet<u32> = inner
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| id)
        .collect();
    let byte_fallback = |t: &str| {
        let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
        (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
    };
    (0..inner.get_vocab_size(true) as u32)
        .map(|id| {
            let Some(token) = inner.id_to_token(id) else {
                return Box::default();
            };
            if special.contains(&id) {
                return token.into_bytes().into_boxed_slice();
            }
            if byte_level
                && let Some(bytes) = token.chars().map(|c| symbols.get(&c).copied()).collect()
            {
                return bytes;
            }
            if let Some(b) = byte_fallback(&token) {
                return Box::new([b]);
            }
            token
                .replace('\u{2581}', " ")
                .into_bytes()
                .into_boxed_slice()
        })
        .collect()
}

/// A token field of `tokenizer_config.json`: a plain string or an `AddedToken` object.
fn token_field(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (and `tokenizer_config.json` when present) from a checkpoint
    /// directory; `None` when the checkpoint has no tokenizer.
    pub fn from_dir(dir: &Path) -> Result<Option<TextTokenizer>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| tok_err(&format!("reading {}", path.display()), e))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| EngineError::io(&config_path, e))?;
            serde_json::from_str(&text).map_err(|e| {
                EngineError::input(
                    "tokenizer_config.json",
                    format!("{}: {e}", config_path.display()),
                )
            })?
        } else {
            Value::Null
        };
        // A template is a string, or a list of named templates of which "default" is used.
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => None,
        };
        Ok(Some(TextTokenizer {
            bytes: Arc::new(token_bytes_table(&inner)),
            inner,
            chat_template,
            bos_token: token_field(&config, "bos_token"),
            eos_token: token_field(&config, "eos_token"),
        }))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (DeepSeek: the begin-of-sentence token).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| tok_err("decoding", e))
    }

    /// The vocabulary entry of one id (byte-level symbols as stored), if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The bytes one token stands for (OpenAI's logprob `bytes`), which may be part of a UTF-8
    /// character: a byte-level BPE token's bytes, a byte-fallback token's (`<0x0A>`) byte,
    /// SentencePiece's `▁` as a space, a special token's text. Empty past the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| b)
    }

    /// The text of one token as a client sees it (byte-level symbols decoded).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Renders `messages` through the checkpoint's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            EngineError::input(
                "messages",
                "this model has no chat template (tokenizer_config.json has no chat_template)",
            )
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| EngineError::input("chat_template", e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| EngineError::input("chat_template", e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| EngineError::input("messages", format!("chat template: {e}")))
    }
}

/// Turns a growing list of ids into text pieces, holding back ids that end inside a
/// multi-byte character (the TGI / vLLM prefix-offset method).
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// `ids` are all the sequence's output ids so far; returns the new text they add.
    pub fn next(&mut self, tokenizer: &TextTokenizer, ids: &[u32]) -> Result<String> {
        let prefix = tokenizer.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && let Some(piece) = full.get(prefix.len()..)
        {
            let piece = piece.to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
            return Ok(piece);
        }
        Ok(String::new())
    }

    /// Whatever is still held back, at the end of a sequence.
    pub fn flush(&mut self, tokenizer: &TextTokenizer, ids: &[u32]) -> Result<String> {
        let prefix = tokenizer.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&ids[self.prefix_offset..])?;
        self.prefix_offset = ids.len();
        self.read_offset = ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_owned())
    }
}

/// Training text of the synthetic tokenizer: fixed English and code, then seeded pseudo-words
/// drawn Zipf-like from a generated lexicon, so a vocabulary of any size finds merges.
fn synthetic_corpus(vocab_size: usize, seed: u64) -> Vec<String> {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    const BASE: &str = include_str!("tokenizer_corpus.txt");
    let mut docs: Vec<String> = BASE.split("\n\n").map(str::to_owned).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    const ONSETS: &[&str] = &[
        "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr",
        "pl", "ch", "sh", "th", "gr", "br",
    ];
    const NUCLEI: &[&str] = &["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y"];
    const CODAS: &[&str] = &["", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "ck"];
    let lexicon: Vec<String> = (0..vocab_size.max(256) * 2)
        .map(|_| {
            let syllables = rng.random_range(1..=4);
            (0..syllables)
                .map(|_| {
                    format!(
                        "{}{}{}",
                        ONSETS[rng.random_range(0..ONSETS.len())],
                        NUCLEI[rng.random_range(0..NUCLEI.len())],
                        CODAS[rng.random_range(0..CODAS.len())]
                    )
                })
                .collect()
        })
        .collect();
    // About 40 bytes of text per vocabulary entry is enough for the merges to exist.
    let target = vocab_size * 40;
    let mut written = 0;
    while written < target {
        let mut doc = String::new();
        for _ in 0..rng.random_range(20..120) {
            // Zipf-like: rank ~ 1 / u² concentrates on the first words of the lexicon.
            let u: f64 = rng.random_range(0.0..1.0);
            let rank = ((lexicon.len() as f64) * u * u * u) as usize;
            doc.push_str(&lexicon[rank.min(lexicon.len() - 1)]);
            doc.push(match rng.random_range(0..20) {
                0 => '.',
                1 => ',',
                _ => ' ',
            });
            if rng.random_range(0..30) == 0 {
                doc.push_str(&rng.random_range(0..10_000).to_string());
                doc.push(' ');
            }
        }
        written += doc.len();
        docs.push(doc);
    }
    docs
}

/// Writes `tokenizer.json` (a byte-level BPE trained to `vocab_size` entries, DeepSeek's
/// special tokens first) and `tokenizer_config.json` (with a DeepSeek-style chat template).
/// Deterministic: the same size and seed give the same files.
pub fn write_synthetic(dir: &Path, vocab_size: usize, seed: u64) -> Result<()> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
        TokenizerBuilder,
    };

    let specials = [BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN];
    let min = 256 + specials.len();
    if vocab_size < min {
        return Err(EngineError::input(
            "vocab_size",
            format!("a byte-level tokenizer needs >= {min} entries, got {vocab_size}"),
        ));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(
            specials
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS_TOKEN} $A"))
        .and_then(|b| {
            b.special_tokens(vec![(BOS_TOKEN, 0)])
                .build()
                .map_err(|e| e.to_string())
        })
        .map_err(|e| tok_err("building the post-processor", e))?;
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(post.into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| tok_err("building", e))?;
    tokenizer
        .train(&mut trainer, synthetic_corpus(vocab_size, seed).into_iter())
        .map_err(|e| tok_err("training", e))?;
    let tokenizer: Tokenizer = tokenizer.into();
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| tok_err("writing tokenizer.json", e))?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": true,
        "add_eos_token": false,
        "model_max_length": 163840,
        "chat_template": SYNTHETIC_CHAT_TEMPLATE,
    });
    let path = dir.join("tokenizer_config.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&config).map_err(|e| tok_err("serialising", e))?,
    )
    .map_err(|e| EngineError::io(&path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(vocab: usize) -> (tempfile::TempDir, TextTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        write_synthetic(dir.path(), vocab, 0).unwrap();
        let t = TextTokenizer::from_dir(dir.path()).unwrap().unwrap();
        (dir, t)
    }

    #[test]
    fn synthetic_tokenizer_round_trips_text_and_places_specials_first() {
        let (_dir, t) = synthetic(512);
        assert_eq!(t.vocab_size(), 512);
        assert_eq!(t.token_to_id(BOS_TOKEN), Some(0));
        assert_eq!(t.token_to_id(EOS_TOKEN), Some(1));
        let text = "Hello, wörld! fn main() { println!(\"多\"); }";
        let ids = t.encode(text, true).unwrap();
        assert_eq!(ids[0], 0, "the begin-of-sentence token leads");
        assert_eq!(t.decode(&ids).unwrap(), text);
        // Merges make common English cheaper than one token per byte.
        let plain = "the experts of the model are on the workers";
        assert!(t.encode(plain, false).unwrap().len() < plain.len());
    }

    #[test]
    fn token_bytes_concatenate_to_the_text_even_inside_a_character() {
        let (_dir, t) = synthetic(512);
        let text = "Hello, wörld! 多 \n\t end";
        let ids = t.encode(text, false).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| t.token_bytes(id).to_vec())
            .collect();
        assert_eq!(bytes, text.as_bytes());
        // "多" is three bytes; in a 512-token vocabulary at least one is a token alone, which
        // no text can show (the old U+FFFD).
        assert!(
            ids.iter()
                .any(|&id| std::str::from_utf8(t.token_bytes(id)).is_err())
        );
        assert_eq!(t.token_bytes(0), BOS_TOKEN.as_bytes());
        assert!(t.token_bytes(512).is_empty());
    }

    #[test]
    fn synthetic_tokenizer_is_deterministic() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_synthetic(a.path(), 600, 3).unwrap();
        write_synthetic(b.path(), 600, 3).unwrap();
        let read = |d: &Path| std::fs::read(d.join("tokenizer.json")).unwrap();
        assert_eq!(read(a.path()), read(b.path()));
    }

    #[test]
    fn chat_template_renders_turns_with_special_tokens() {
        let (_dir, t) = synthetic(512);
        let messages = vec![
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            },
        ];
        let text = t.apply_chat_template(&messages, true).unwrap();
        assert_eq!(
            text,
            format!("{BOS_TOKEN}Be brief.{USER_TOKEN}Hi{ASSISTANT_TOKEN}")
        );
        let ids = t.encode(&text, false).unwrap();
        assert!(ids.contains(&t.token_to_id(USER_TOKEN).unwrap()));
        let bad = vec![ChatMessage {
            role: "tool".into(),
            content: "x".into(),
        }];
        let err = t.apply_chat_template(&bad, true).unwrap_err().to_string();
        assert!(err.contains("unknown role tool"), "{err}");
    }

    #[test]
    fn incremental_decoding_matches_whole_decoding() {
        let (_dir, t) = synthetic(512);
        let text = "naïve café — 多语言 text, with emoji 🚀 and more";
        let ids = t.encode(text, false).unwrap();
        let mut d = IncrementalDecoder::default();
        let mut out = String::new();
        for n in 1..=ids.len() {
            let piece = d.next(&t, &ids[..n]).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&d.flush(&t, &ids).unwrap());
        assert_eq!(out, text);
    }
}
