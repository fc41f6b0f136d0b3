//! The OpenAI wire types this server accepts and returns, and their mapping to
//! [`RawRequest`]. Fields OpenAI documents and vLLM's common extensions (`top_k`, `min_p`,
//! `repetition_penalty`, `stop_token_ids`, `ignore_eos`) are accepted; a field that cannot be
//! honoured (`n > 1`, `echo`, `best_of > 1`) is refused by name rather than ignored.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_engine::tokenizer::ChatMessage;

use crate::error::RouterError;
use crate::request::{Prompt, RawRequest};

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
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
    pub user: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
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
    pub user: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, a list of content parts, or null (assistant turns with tool calls).
    #[serde(default)]
    pub content: Value,
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

impl ChatRequest {
    pub fn into_raw(self) -> Result<RawRequest, RouterError> {
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
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
            400 => "invalid_request_error",
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
