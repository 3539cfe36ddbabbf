//! Portcullis: an OpenAI-compatible LLM gateway. See `ARCHITECTURE.md` for the map.

pub mod admin;
pub mod call;
pub mod config;
pub mod cost;
pub mod digest;
pub mod error;
pub mod extension;
pub mod generation;
pub mod governance;
pub mod json;
pub mod openai;
pub mod pipeline;
pub mod plugins;
pub mod providers;
pub mod reload;
pub mod router;
pub mod server;
pub mod sse;
pub mod tokens;
