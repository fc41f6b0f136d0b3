//! The OpenAI wire types this server accepts and returns, and their mapping to
//! [`RawRequest`]. Every field of a request is honoured or refused by name, never dropped:
//! the typed fields (OpenAI's, and vLLM's `top_k`, `min_p`, `repetition_penalty`,
//! `stop_token_ids`, `ignore_eos`) map onto the request; any other field is checked by
//! [`check_other_field`], which accepts only values that ask for what this server does anyway
//! (`response_format: {"type": "text"}`, `tool_choice: "none"`, `store: false`, …) and refuses
//! the rest (`n > 1`, `echo`, `tools`, structured output, unknown names) with a 400 naming
//! the field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_engine::tokenizer::ChatMessage;

use crate::error::RouterError;
use crate::request::{Prompt, RawRequest};

/// `stop`: one string or a list.
#[derive(Debug)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// By hand rather than `#[serde(untagged)]`, whose error ("data did not match any variant")
/// says neither what was given nor what is accepted.
impl<'de> Deserialize<'de> for StopField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = StopField;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StopField, E> {
                Ok(StopField::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StopField, A::Error> {
                let mut all = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(s) = seq.next_element::<String>()? {
                    all.push(s);
                }
                Ok(StopField::Many(all))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl StopField {
    fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub n: Option<u32>,
    /// Token id (as a string, OpenAI's JSON) → bias added to its logit, in [-100, 100].
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Seconds; a Switchyard extension.
    pub timeout: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Value,
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    pub best_of: Option<u32>,
    /// An end-user id for the operator's logs (OpenAI's meaning); logged with the request.
    pub user: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Every field not named above; each is checked by [`check_other_field`]. Last, so the
    /// flattened sampling fields have taken theirs first.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    /// An end-user id for the operator's logs (OpenAI's meaning); logged with the request.
    pub user: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Every field not named above, checked by [`check_other_field`].
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, a list of content parts, or null (assistant turns with tool calls).
    #[serde(default)]
    pub content: Value,
    /// `name`, `tool_calls`, `tool_call_id`, …: refused unless null (the chat templates here
    /// render role and content only).
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// Which endpoint a field came to: a few fields mean something on one only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// A request field outside the typed ones: `Ok` when its value asks for what this server
/// does anyway (null is "not given"), otherwise a refusal naming it.
pub fn check_other_field(endpoint: Endpoint, name: &str, value: &Value) -> Result<(), RouterError> {
    if value.is_null() {
        return Ok(());
    }
    let chat = endpoint == Endpoint::Chat;
    let refuse = |reason: String| Err(RouterError::invalid(name, reason));
    let shown = || {
        let mut v = value.to_string();
        if v.len() > 80 {
            let cut = (0..=80).rev().find(|&i| v.is_char_boundary(i)).unwrap_or(0);
            v.truncate(cut);
            v.push('…');
        }
        v
    };
    let is = |expected: Value| *value == expected;
    let ok = match name {
        // Free text is what every response is.
        "response_format" if chat => {
            if value.get("type").and_then(Value::as_str) == Some("text") {
                true
            } else {
                return refuse(format!(
                    "structured output (json_object, json_schema) is not supported yet; only {{\"type\": \"text\"}} is, got {}",
                    shown()
                ));
            }
        }
        "tools" | "functions" if chat => {
            if value.as_array().is_some_and(Vec::is_empty) {
                true
            } else {
                return refuse(format!(
                    "tool calling is not supported yet: send no tools, got {}",
                    shown()
                ));
            }
        }
        // With no tools, "auto" and "none" both mean plain text.
        "tool_choice" | "function_call" if chat => {
            if is(Value::from("none")) || is(Value::from("auto")) {
                true
            } else {
                return refuse(format!(
                    "needs tools, which are not supported yet: only \"none\" or \"auto\" is accepted, got {}",
                    shown()
                ));
            }
        }
        "parallel_tool_calls" if chat => value.is_boolean(),
        "modalities" if chat => is(serde_json::json!(["text"])),
        "store" => is(Value::Bool(false)),
        "service_tier" => is(Value::from("auto")) || is(Value::from("default")),
        "suffix" if !chat => is(Value::from("")),
        // vLLM's extensions, at the values that are this server's behaviour.
        "min_tokens" => is(Value::from(0)),
        "skip_special_tokens" => is(Value::Bool(true)),
        "include_stop_str_in_output" => is(Value::Bool(false)),
        "add_generation_prompt" if chat => is(Value::Bool(true)),
        "echo" if chat => is(Value::Bool(false)),
        "use_beam_search" => is(Value::Bool(false)),
        "guided_json" | "guided_regex" | "guided_choice" | "guided_grammar" => {
            return refuse("guided decoding is not supported yet".into());
        }
        "metadata"
        | "prediction"
        | "audio"
        | "reasoning_effort"
        | "web_search_options"
        | "prompt_logprobs"
        | "logit_bias_type"
        | "chat_template"
        | "chat_template_kwargs"
        | "documents"
        | "priority"
        | "truncate_prompt_tokens"
        | "bad_words"
        | "allowed_token_ids"
        | "length_penalty"
        | "min_tokens_ratio" => {
            return refuse(format!("is not supported by this server, got {}", shown()));
        }
        _ => {
            return refuse(format!(
                "is not a field of {} this server knows, got {}",
                if chat {
                    "/v1/chat/completions"
                } else {
                    "/v1/completions"
                },
                shown()
            ));
        }
    };
    if ok {
        Ok(())
    } else {
        refuse(format!(
            "only the value that is this server's behaviour is accepted here, got {}",
            shown()
        ))
    }
}

fn check_other_fields(
    endpoint: Endpoint,
    other: &serde_json::Map<String, Value>,
) -> Result<(), RouterError> {
    other
        .iter()
        .try_for_each(|(name, value)| check_other_field(endpoint, name, value))
}

/// `logit_bias`'s string keys as token ids (the values are the validator's to check).
fn logit_bias_of(bias: BTreeMap<String, f32>) -> Result<Vec<(u32, f32)>, RouterError> {
    bias.into_iter()
        .map(|(key, v)| match key.trim().parse::<u32>() {
            Ok(id) => Ok((id, v)),
            Err(_) => Err(RouterError::invalid(
                "logit_bias",
                format!("keys must be token ids (integers >= 0), got {key:?}"),
            )),
        })
        .collect()
}

fn apply_sampling(raw: &mut RawRequest, s: SamplingFields) -> Result<(), RouterError> {
    if let Some(n) = s.n
        && n != 1
    {
        return Err(RouterError::invalid(
            "n",
            format!("only 1 choice per request is supported, got {n}"),
        ));
    }
    raw.temperature = s.temperature;
    raw.top_p = s.top_p;
    raw.top_k = s.top_k;
    raw.min_p = s.min_p;
    raw.repetition_penalty = s.repetition_penalty;
    raw.presence_penalty = s.presence_penalty;
    raw.frequency_penalty = s.frequency_penalty;
    raw.seed = s.seed;
    raw.stop = s.stop.map(StopField::into_vec).unwrap_or_default();
    raw.stop_token_ids = s.stop_token_ids;
    raw.ignore_eos = s.ignore_eos;
    raw.logit_bias = s
        .logit_bias
        .map(logit_bias_of)
        .transpose()?
        .unwrap_or_default();
    raw.timeout = match s.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(RouterError::invalid(
                "timeout",
                format!("must be a positive number of seconds, got {t}"),
            ));
        }
    };
    Ok(())
}

fn prompt_of(value: Value) -> Result<Prompt, RouterError> {
    let ids = |list: &[Value]| -> Option<Vec<u32>> {
        list.iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    match value {
        Value::String(s) => Ok(Prompt::Text(s)),
        Value::Array(list) if list.len() == 1 && list[0].is_string() => Ok(Prompt::Text(
            list[0].as_str().unwrap_or_default().to_owned(),
        )),
        Value::Array(list) if list.len() == 1 && list[0].is_array() => {
            let inner = list[0].as_array().map(Vec::as_slice).unwrap_or_default();
            ids(inner).map(Prompt::Ids).ok_or_else(|| {
                RouterError::invalid("prompt", "token ids must be integers in 0..2^32")
            })
        }
        Value::Array(list) if list.iter().all(Value::is_number) => ids(&list)
            .map(Prompt::Ids)
            .ok_or_else(|| RouterError::invalid("prompt", "token ids must be integers in 0..2^32")),
        Value::Array(list) => Err(RouterError::invalid(
            "prompt",
            format!(
                "one prompt per request is supported (a string, or a list of token ids), got a list of {}",
                list.len()
            ),
        )),
        other => Err(RouterError::invalid(
            "prompt",
            format!(
                "must be a string or a list of token ids, got {}",
                kind(&other)
            ),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl CompletionRequest {
    pub fn into_raw(self) -> Result<RawRequest, RouterError> {
        check_other_fields(Endpoint::Completions, &self.other)?;
        if self.echo {
            return Err(RouterError::invalid("echo", "is not supported, got true"));
        }
        if let Some(b) = self.best_of
            && b > 1
        {
            return Err(RouterError::invalid(
                "best_of",
                format!("only 1 is supported, got {b}"),
            ));
        }
        let mut raw = RawRequest::new(prompt_of(self.prompt)?);
        raw.model = self.model;
        // OpenAI's default for completions.
        raw.max_tokens = Some(self.max_tokens.unwrap_or(16));
        raw.logprobs = self.logprobs;
        apply_sampling(&mut raw, self.sampling)?;
        Ok(raw)
    }
}

/// Chat messages as the templates take them: text content only, no other fields.
pub fn messages_of(input: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, RouterError> {
    let mut messages = Vec::with_capacity(input.len());
    for (i, m) in input.into_iter().enumerate() {
        if let Some((name, _)) = m.other.iter().find(|(_, v)| !v.is_null()) {
            return Err(RouterError::invalid(
                format!("messages[{i}].{name}"),
                "is not supported: the chat templates here render a message's role and content only",
            ));
        }
        let content = match m.content {
            Value::String(s) => s,
            Value::Null => String::new(),
            Value::Array(parts) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        (t, _) => {
                            return Err(RouterError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                format!(
                                    "only text parts are supported, got type {}",
                                    t.unwrap_or("(none)")
                                ),
                            ));
                        }
                    }
                }
                text
            }
            other => {
                return Err(RouterError::invalid(
                    format!("messages[{i}].content"),
                    format!("must be a string or a list of parts, got {}", kind(&other)),
                ));
            }
        };
        messages.push(ChatMessage {
            role: m.role,
            content,
        });
    }
    Ok(messages)
}

/// vLLM's `/tokenize`: a prompt, or chat messages rendered through the template.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Default: true for a prompt, false for messages (the template writes its own).
    pub add_special_tokens: Option<bool>,
    /// Messages only; default true.
    pub add_generation_prompt: Option<bool>,
    /// Also return each token's text.
    #[serde(default)]
    pub return_token_strs: bool,
}

/// vLLM's `/detokenize`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

impl ChatRequest {
    pub fn into_raw(self) -> Result<RawRequest, RouterError> {
        check_other_fields(Endpoint::Chat, &self.other)?;
        let messages = messages_of(self.messages)?;
        let mut raw = RawRequest::new(Prompt::Chat(messages));
        raw.model = self.model;
        raw.max_tokens = self.max_completion_tokens.or(self.max_tokens);
        raw.logprobs = match (self.logprobs, self.top_logprobs) {
            (true, n) => Some(n.unwrap_or(0)),
            (false, Some(n)) if n > 0 => {
                return Err(RouterError::invalid(
                    "top_logprobs",
                    format!("needs logprobs: true, got {n} without it"),
                ));
            }
            (false, _) => None,
        };
        apply_sampling(&mut raw, self.sampling)?;
        Ok(raw)
    }
}

#[derive(Debug, Serialize)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl UsageOut {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> UsageOut {
        UsageOut {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn from_error(e: &RouterError) -> ErrorBody {
        let kind = match e.http_status() {
            400 | 405 | 413 => "invalid_request_error",
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            504 => "timeout",
            _ => "server_error",
        };
        let param = match e {
            RouterError::Invalid { field, .. } => Some(field.clone()),
            RouterError::UnknownModel { .. } => Some("model".into()),
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message: e.to_string(),
                kind,
                param,
                code: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(body: Value) -> Result<RawRequest, RouterError> {
        serde_json::from_value::<CompletionRequest>(body)
            .map_err(|e| RouterError::invalid("body", e.to_string()))?
            .into_raw()
    }

    #[test]
    fn completion_prompts_in_every_accepted_shape() {
        let text = completion(serde_json::json!({"prompt": "hi"})).unwrap();
        assert_eq!(text.prompt, Prompt::Text("hi".into()));
        assert_eq!(text.max_tokens, Some(16));
        let ids = completion(serde_json::json!({"prompt": [1, 2, 3]})).unwrap();
        assert_eq!(ids.prompt, Prompt::Ids(vec![1, 2, 3]));
        let nested = completion(serde_json::json!({"prompt": [[4, 5]]})).unwrap();
        assert_eq!(nested.prompt, Prompt::Ids(vec![4, 5]));
        let one = completion(serde_json::json!({"prompt": ["x"], "stop": "\n"})).unwrap();
        assert_eq!(
            (one.prompt, one.stop),
            (Prompt::Text("x".into()), vec!["\n".into()])
        );
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        for (body, field) in [
            (serde_json::json!({"prompt": ["a", "b"]}), "prompt"),
            (serde_json::json!({"prompt": [-1]}), "prompt"),
            (serde_json::json!({"prompt": {"x": 1}}), "prompt"),
            (serde_json::json!({"prompt": "a", "n": 2}), "n"),
            (serde_json::json!({"prompt": "a", "echo": true}), "echo"),
            (serde_json::json!({"prompt": "a", "best_of": 3}), "best_of"),
            (
                serde_json::json!({"prompt": "a", "timeout": -1.0}),
                "timeout",
            ),
        ] {
            let err = completion(body.clone()).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{body}: {err}");
        }
    }

    fn chat(body: Value) -> Result<RawRequest, RouterError> {
        serde_json::from_value::<ChatRequest>(body)
            .map_err(|e| RouterError::invalid("body", e.to_string()))?
            .into_raw()
    }

    /// What a field's value should do.
    enum Expect {
        /// Accepted, and the request shows it (`|_| true` for fields the handler reads).
        Honoured(fn(&RawRequest) -> bool),
        /// A 400 naming the field.
        Refused,
    }
    use Expect::{Honoured, Refused};

    fn check_table(endpoint: Endpoint, table: Vec<(&str, Value, Expect)>) {
        for (field, value, expect) in table {
            let mut body = match endpoint {
                Endpoint::Completions => serde_json::json!({"prompt": "a"}),
                Endpoint::Chat => {
                    serde_json::json!({"messages": [{"role": "user", "content": "a"}]})
                }
            };
            body[field] = value.clone();
            if field == "top_logprobs" {
                body["logprobs"] = Value::Bool(true);
            }
            let got = match endpoint {
                Endpoint::Completions => completion(body),
                Endpoint::Chat => chat(body),
            };
            match (expect, got) {
                (Honoured(shows), Ok(raw)) => {
                    assert!(
                        shows(&raw),
                        "{endpoint:?} {field}: {value} accepted but not in {raw:?}"
                    )
                }
                (Honoured(_), Err(e)) => panic!("{endpoint:?} {field}: {value} refused: {e}"),
                (Refused, Ok(raw)) => {
                    panic!("{endpoint:?} {field}: {value} accepted and dropped: {raw:?}")
                }
                (Refused, Err(e)) => {
                    let name = field.split('.').next().unwrap_or(field);
                    assert!(
                        e.to_string().contains(&format!("`{name}")),
                        "{endpoint:?} {field}: {value}: the error does not name it: {e}"
                    );
                    assert_eq!(e.http_status(), 400);
                }
            }
        }
    }

    /// Every field of OpenAI's completions request (and the vLLM extensions users send):
    /// honoured, or refused by name.
    #[test]
    fn every_completions_field_is_honoured_or_refused() {
        use serde_json::json;
        check_table(
            Endpoint::Completions,
            vec![
                (
                    "model",
                    json!("m"),
                    Honoured(|r| r.model.as_deref() == Some("m")),
                ),
                ("best_of", json!(1), Honoured(|_| true)),
                ("best_of", json!(2), Refused),
                ("echo", json!(false), Honoured(|_| true)),
                ("echo", json!(true), Refused),
                (
                    "frequency_penalty",
                    json!(0.5),
                    Honoured(|r| r.frequency_penalty == Some(0.5)),
                ),
                (
                    "logit_bias",
                    json!({"46": -100}),
                    Honoured(|r| r.logit_bias == [(46, -100.0)]),
                ),
                ("logit_bias", json!({"x": 1}), Refused),
                ("logprobs", json!(2), Honoured(|r| r.logprobs == Some(2))),
                (
                    "max_tokens",
                    json!(5),
                    Honoured(|r| r.max_tokens == Some(5)),
                ),
                ("n", json!(1), Honoured(|_| true)),
                ("n", json!(2), Refused),
                (
                    "presence_penalty",
                    json!(-0.5),
                    Honoured(|r| r.presence_penalty == Some(-0.5)),
                ),
                ("seed", json!(3), Honoured(|r| r.seed == Some(3))),
                (
                    "stop",
                    json!(["x", "y"]),
                    Honoured(|r| r.stop == ["x", "y"]),
                ),
                ("stream", json!(true), Honoured(|_| true)),
                (
                    "stream_options",
                    json!({"include_usage": true}),
                    Honoured(|_| true),
                ),
                ("suffix", json!(null), Honoured(|_| true)),
                ("suffix", json!("}"), Refused),
                (
                    "temperature",
                    json!(0.3),
                    Honoured(|r| r.temperature == Some(0.3)),
                ),
                ("top_p", json!(0.9), Honoured(|r| r.top_p == Some(0.9))),
                ("user", json!("u-1"), Honoured(|_| true)),
                ("top_k", json!(5), Honoured(|r| r.top_k == Some(5))),
                ("min_p", json!(0.1), Honoured(|r| r.min_p == Some(0.1))),
                (
                    "repetition_penalty",
                    json!(1.2),
                    Honoured(|r| r.repetition_penalty == Some(1.2)),
                ),
                (
                    "stop_token_ids",
                    json!([7]),
                    Honoured(|r| r.stop_token_ids == [7]),
                ),
                ("ignore_eos", json!(true), Honoured(|r| r.ignore_eos)),
                (
                    "timeout",
                    json!(2.5),
                    Honoured(|r| r.timeout == Some(Duration::from_millis(2500))),
                ),
                ("min_tokens", json!(0), Honoured(|_| true)),
                ("min_tokens", json!(4), Refused),
                ("skip_special_tokens", json!(false), Refused),
                ("include_stop_str_in_output", json!(true), Refused),
                ("guided_json", json!({"type": "object"}), Refused),
                ("guided_regex", json!("a+"), Refused),
                ("prompt_logprobs", json!(1), Refused),
                ("response_format", json!({"type": "text"}), Refused),
                ("no_such_field", json!(1), Refused),
                ("no_such_field", json!(null), Honoured(|_| true)),
            ],
        );
    }

    /// Every field of OpenAI's chat completions request: honoured, or refused by name.
    #[test]
    fn every_chat_field_is_honoured_or_refused() {
        use serde_json::json;
        check_table(
            Endpoint::Chat,
            vec![
                (
                    "model",
                    json!("m"),
                    Honoured(|r| r.model.as_deref() == Some("m")),
                ),
                ("audio", json!({"voice": "alloy", "format": "wav"}), Refused),
                (
                    "frequency_penalty",
                    json!(0.5),
                    Honoured(|r| r.frequency_penalty == Some(0.5)),
                ),
                ("function_call", json!("auto"), Honoured(|_| true)),
                ("function_call", json!({"name": "f"}), Refused),
                ("functions", json!([{"name": "f"}]), Refused),
                (
                    "logit_bias",
                    json!({"9": 100}),
                    Honoured(|r| r.logit_bias == [(9, 100.0)]),
                ),
                ("logprobs", json!(true), Honoured(|r| r.logprobs == Some(0))),
                (
                    "max_completion_tokens",
                    json!(4),
                    Honoured(|r| r.max_tokens == Some(4)),
                ),
                (
                    "max_tokens",
                    json!(6),
                    Honoured(|r| r.max_tokens == Some(6)),
                ),
                ("metadata", json!({"k": "v"}), Refused),
                ("modalities", json!(["text"]), Honoured(|_| true)),
                ("modalities", json!(["text", "audio"]), Refused),
                ("n", json!(3), Refused),
                ("parallel_tool_calls", json!(false), Honoured(|_| true)),
                (
                    "prediction",
                    json!({"type": "content", "content": "x"}),
                    Refused,
                ),
                (
                    "presence_penalty",
                    json!(0.25),
                    Honoured(|r| r.presence_penalty == Some(0.25)),
                ),
                ("reasoning_effort", json!("low"), Refused),
                (
                    "response_format",
                    json!({"type": "text"}),
                    Honoured(|_| true),
                ),
                ("response_format", json!({"type": "json_object"}), Refused),
                (
                    "response_format",
                    json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}),
                    Refused,
                ),
                ("seed", json!(11), Honoured(|r| r.seed == Some(11))),
                ("service_tier", json!("auto"), Honoured(|_| true)),
                ("service_tier", json!("flex"), Refused),
                ("stop", json!("\n"), Honoured(|r| r.stop == ["\n"])),
                ("store", json!(false), Honoured(|_| true)),
                ("store", json!(true), Refused),
                ("stream", json!(true), Honoured(|_| true)),
                (
                    "stream_options",
                    json!({"include_usage": true}),
                    Honoured(|_| true),
                ),
                (
                    "temperature",
                    json!(0.0),
                    Honoured(|r| r.temperature == Some(0.0)),
                ),
                ("tool_choice", json!("none"), Honoured(|_| true)),
                ("tool_choice", json!("required"), Refused),
                (
                    "tool_choice",
                    json!({"type": "function", "function": {"name": "f"}}),
                    Refused,
                ),
                (
                    "tools",
                    json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
                    Refused,
                ),
                ("tools", json!([]), Honoured(|_| true)),
                (
                    "top_logprobs",
                    json!(2),
                    Honoured(|r| r.logprobs == Some(2)),
                ),
                ("top_p", json!(0.5), Honoured(|r| r.top_p == Some(0.5))),
                ("user", json!("u-2"), Honoured(|_| true)),
                ("web_search_options", json!({}), Refused),
                ("echo", json!(true), Refused),
                ("add_generation_prompt", json!(false), Refused),
                ("guided_choice", json!(["a", "b"]), Refused),
                (
                    "chat_template_kwargs",
                    json!({"enable_thinking": false}),
                    Refused,
                ),
                ("no_such_field", json!("x"), Refused),
            ],
        );
        // Message fields the templates cannot render are refused by path.
        let err = chat(serde_json::json!({
            "messages": [{"role": "user", "content": "a", "name": "bob"}]
        }))
        .unwrap_err()
        .to_string();
        assert!(err.contains("`messages[0].name`"), "{err}");
    }

    #[test]
    fn chat_content_parts_and_logprob_flags() {
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "logprobs": true, "top_logprobs": 3, "max_completion_tokens": 7
        }))
        .unwrap();
        let raw = req.into_raw().unwrap();
        assert_eq!(
            raw.prompt,
            Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "ab".into()
            }])
        );
        assert_eq!((raw.logprobs, raw.max_tokens), (Some(3), Some(7)));
        let img: ChatRequest = serde_json::from_value(serde_json::json!({
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
        }))
        .unwrap();
        let err = img.into_raw().unwrap_err().to_string();
        assert!(
            err.contains("messages[0].content[0]") && err.contains("image_url"),
            "{err}"
        );
    }
}
