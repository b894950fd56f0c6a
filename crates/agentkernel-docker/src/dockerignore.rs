//! `.dockerignore` for `[build]`'s context, as the Docker CLI reads it:
//! one pattern per line, `#` lines are comments, `!` re-includes, patterns
//! are cleaned paths relative to the context (a leading `/` dropped) in Go's
//! `filepath.Match` syntax plus `**`; the last pattern that matches a path —
//! or one of its parent directories — decides.

use std::path::Path;

use glob::{MatchOptions, Pattern};

pub struct Rules {
    rules: Vec<(Pattern, bool)>,
}

const MATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl Rules {
    /// The context's `.dockerignore`; no rules when there is none.
    pub fn read(context: &Path) -> std::io::Result<Rules> {
        match std::fs::read_to_string(context.join(".dockerignore")) {
            Ok(text) => Rules::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Rules { rules: Vec::new() }),
            Err(e) => Err(e),
        }
    }

    fn parse(text: &str) -> std::io::Result<Rules> {
        let mut rules = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            let (line, include) = match line.strip_prefix('!') {
                Some(rest) => (rest.trim(), true),
                None => (line, false),
            };
            if line.is_empty() {
                continue;
            }
            let pattern = Pattern::new(&clean(line)).map_err(|e| {
                std::io::Error::other(format!(".dockerignore pattern `{line}`: {e}"))
            })?;
            rules.push((pattern, include));
        }
        Ok(Rules { rules })
    }

    /// Some rule re-includes (`!`): an excluded directory must still be walked.
    pub fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|(_, include)| *include)
    }

    /// True when `relative` (a `/`-separated path in the context) is left out.
    pub fn excludes(&self, relative: &str) -> bool {
        let mut excluded = false;
        for (pattern, include) in &self.rules {
            let hit = pattern.matches_with(relative, MATCH)
                || relative
                    .match_indices('/')
                    .any(|(i, _)| pattern.matches_with(&relative[..i], MATCH));
            if hit {
                excluded = !include;
            }
        }
        excluded
    }
}

/// Go's `filepath.Clean` for a relative pattern: no `.`, no empty
/// components, `..` folded, no leading `/`.
fn clean(pattern: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in pattern.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_cli_semantics() {
        let rules = Rules::parse(
            "# comment\nnode_modules\n/build/\n*.log\n**/secret*\n!keep.log\ndocs/*.md\n!docs/README.md\n",
        )
        .unwrap();
        for (path, excluded) in [
            ("node_modules", true),
            ("node_modules/x/index.js", true),
            ("src/node_modules", false),
            ("build/out.o", true),
            ("a.log", true),
            ("dir/a.log", false),
            ("keep.log", false),
            ("deep/er/secret.txt", true),
            ("secret.txt", true),
            ("docs/guide.md", true),
            ("docs/README.md", false),
            ("src/main.rs", false),
        ] {
            assert_eq!(rules.excludes(path), excluded, "{path}");
        }
        assert!(rules.has_exceptions());
        assert_eq!(clean("./a/../b//c/"), "b/c");
    }
}
