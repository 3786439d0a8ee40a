//! Every ```rust block of the README (but ```rust,ignore) is code that
//! compiles: it is found, line for line, in one of the examples, which the
//! workspace builds. Comments and blank lines aside, so a block may explain
//! more than its example does.

use std::path::Path;

/// A line without its trailing `//` comment and surrounding whitespace.
fn code(line: &str) -> &str {
    let line = line.trim();
    if line.starts_with("//") {
        return "";
    }
    match line.find(" //") {
        Some(at) => line.get(..at).unwrap_or(line).trim_end(),
        None => line,
    }
}

fn code_lines(text: &str) -> Vec<&str> {
    text.lines().map(code).filter(|l| !l.is_empty()).collect()
}

/// The README's ```rust blocks that must compile.
fn rust_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match &mut current {
            None if line.trim() == "```rust" => current = Some(String::new()),
            Some(block) if line.trim() == "```" => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[test]
fn every_rust_block_of_the_readme_is_compiled_in_an_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(dir.join("../README.md")).expect("README.md");
    let examples: Vec<(String, String)> = ["readme.rs", "worker.rs"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).expect("example");
            ((*f).to_owned(), text)
        })
        .collect();
    let blocks = rust_blocks(&readme);
    assert!(blocks.len() >= 4, "found {} rust blocks", blocks.len());
    for block in blocks {
        let wanted = code_lines(&block);
        let found = examples.iter().any(|(_, text)| {
            let lines = code_lines(text);
            lines.windows(wanted.len()).any(|w| w == wanted.as_slice())
        });
        assert!(
            found,
            "this README block is in no compiled example (examples/readme.rs):\n{block}"
        );
    }
}
