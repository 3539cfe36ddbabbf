//! Prices per token and the cost of a call's usage, in USD.

use crate::providers::Usage;

/// USD per token, for prompt and completion tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    pub input: f64,
    pub output: f64,
}

impl Prices {
    pub fn cost(self, usage: Usage) -> f64 {
        usage.prompt_tokens as f64 * self.input + usage.completion_tokens as f64 * self.output
    }

    /// The deployment's own prices if it sets them, else the built-in price of its upstream
    /// model, else zero (a self-hosted model costs nothing per token).
    pub fn for_deployment(upstream_model: &str, input: Option<f64>, output: Option<f64>) -> Prices {
        let known = builtin(upstream_model).unwrap_or(Prices {
            input: 0.0,
            output: 0.0,
        });
        Prices {
            input: input.unwrap_or(known.input),
            output: output.unwrap_or(known.output),
        }
    }
}

/// USD per million tokens (input, output) of common models, as their vendors list them.
/// Longer names first: the first prefix that matches wins, so dated snapshots find their family.
const PER_MILLION: &[(&str, f64, f64)] = &[
    ("gpt-4o-mini", 0.15, 0.60),
    ("gpt-4o", 2.50, 10.00),
    ("gpt-4.1-nano", 0.10, 0.40),
    ("gpt-4.1-mini", 0.40, 1.60),
    ("gpt-4.1", 2.00, 8.00),
    ("gpt-4-turbo", 10.00, 30.00),
    ("gpt-4", 30.00, 60.00),
    ("gpt-3.5-turbo", 0.50, 1.50),
    ("gpt-5-nano", 0.05, 0.40),
    ("gpt-5-mini", 0.25, 2.00),
    ("gpt-5", 1.25, 10.00),
    ("o4-mini", 1.10, 4.40),
    ("o3-mini", 1.10, 4.40),
    ("o3", 2.00, 8.00),
    ("o1-mini", 1.10, 4.40),
    ("o1", 15.00, 60.00),
    ("text-embedding-3-small", 0.02, 0.0),
    ("text-embedding-3-large", 0.13, 0.0),
    ("text-embedding-ada-002", 0.10, 0.0),
    ("claude-3-5-haiku", 0.80, 4.00),
    ("claude-3-haiku", 0.25, 1.25),
    ("claude-haiku-4-5", 1.00, 5.00),
    ("claude-3-5-sonnet", 3.00, 15.00),
    ("claude-3-7-sonnet", 3.00, 15.00),
    ("claude-sonnet-4", 3.00, 15.00),
    ("claude-3-opus", 15.00, 75.00),
    ("claude-opus-4-1", 15.00, 75.00),
    ("claude-opus-4", 15.00, 75.00),
];

fn builtin(model: &str) -> Option<Prices> {
    // "openai/gpt-4o" style names from routers such as OpenRouter.
    let model = model.rsplit('/').next().unwrap_or(model);
    PER_MILLION
        .iter()
        .find(|(prefix, _, _)| model.starts_with(prefix))
        .map(|&(_, input, output)| Prices {
            input: input / 1e6,
            output: output / 1e6,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }

    #[test]
    fn dated_snapshots_find_their_family() {
        let prices = Prices::for_deployment("gpt-4o-mini-2024-07-18", None, None);
        let cost = prices.cost(usage(1_000_000, 1_000_000));
        assert!((cost - 0.75).abs() < 1e-9, "{cost}");
        let gpt4o = Prices::for_deployment("openai/gpt-4o", None, None);
        assert!((gpt4o.cost(usage(1_000_000, 0)) - 2.5).abs() < 1e-9);
    }

    #[test]
    fn deployment_prices_override_and_unknown_models_are_free() {
        let prices = Prices::for_deployment("gpt-4o", Some(1.0), None);
        assert!((prices.cost(usage(2, 0)) - 2.0).abs() < 1e-9);
        assert_eq!(
            Prices::for_deployment("llama3", None, None).cost(usage(5, 5)),
            0.0
        );
    }
}
