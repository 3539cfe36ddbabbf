//! `${VAR}` expansion over the parsed YAML tree, so an error can name the field that asked for it.

use super::ConfigError;

/// Replaces `${NAME}` (or `${NAME:-default}`) in every string value; `$${` is a literal `${`.
pub(super) fn expand(
    value: &mut serde_yaml::Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    walk(value, &mut String::new(), lookup)
}

fn walk(
    value: &mut serde_yaml::Value,
    path: &mut String,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        serde_yaml::Value::String(text) if text.contains('$') => {
            *text = expand_str(text, lookup).map_err(|message| ConfigError::Field {
                field: path.clone(),
                message,
            })?;
        }
        serde_yaml::Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path, lookup)?;
                path.truncate(len);
            }
        }
        serde_yaml::Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key.as_str().unwrap_or("?"));
                walk(item, path, lookup)?;
                path.truncate(len);
            }
        }
        serde_yaml::Value::Tagged(tagged) => walk(&mut tagged.value, path, lookup)?,
        _ => {}
    }
    Ok(())
}

fn expand_str(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in '{text}'"))?;
            let (name, default) = match inner[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&inner[..end], None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("'{name}' is not an environment variable name"));
            }
            let value = lookup(name)
                .or_else(|| default.map(str::to_owned))
                .ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        (name == "A").then(|| "1".to_owned())
    }

    #[test]
    fn expands_escapes_and_leaves_lone_dollars() {
        assert_eq!(expand_str("x${A}y${A}", &lookup).as_deref(), Ok("x1y1"));
        assert_eq!(expand_str("$${A}", &lookup).as_deref(), Ok("${A}"));
        assert_eq!(expand_str("cost $5", &lookup).as_deref(), Ok("cost $5"));
        assert_eq!(
            expand_str("${B:-dev}/${A:-x}", &lookup).as_deref(),
            Ok("dev/1")
        );
        assert!(expand_str("${A", &lookup).is_err());
        assert!(expand_str("${B}", &lookup).is_err());
    }
}
