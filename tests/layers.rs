//! The library's layers point one way: no file under `src/` uses an item of
//! a file that (directly or through others) uses one of its own. Read from
//! the source text, so it needs no service and no build of the crate.
//!
//! A file's uses are the paths it names outside comments: `crate::…`,
//! `super::…`, `self::…` and paths that start with one of its child
//! modules (`publisher::Publisher` in `mq.rs`), in `use` trees, code and
//! macro arguments alike. Declaring a child (`pub mod publisher;`) is not a
//! use. A path is charged to the deepest module file it names. Test code
//! (an item under `#[cfg(test)]`) is left out: a test may drive the crate
//! from above (a config section's tests load a whole config).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Uses that close a known cycle and are being removed, as (file, the file
/// it uses). They are left out of the graph; an entry whose use is gone
/// fails the test, so it is deleted.
const KNOWN_CYCLES: &[(&str, &str)] = &[];

#[test]
fn no_source_file_uses_one_that_uses_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = library_files(&src);
    let modules: BTreeMap<Vec<String>, String> = files
        .iter()
        .map(|path| (module_path(&src, path), display(path)))
        .collect();
    let mut uses: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let from = display(path);
        let edges = uses.entry(from.clone()).or_default();
        for (target, line) in file_uses(&module_path(&src, path), &text, &modules) {
            if target != from {
                edges.entry(target).or_insert(line);
            }
        }
    }

    let mut problems = Vec::new();
    for (from, to) in KNOWN_CYCLES {
        let known = uses.get_mut(*from).and_then(|edges| edges.remove(*to));
        if known.is_none() {
            problems.push(format!(
                "{from} no longer uses {to}: delete their entry in KNOWN_CYCLES"
            ));
        }
    }
    for component in cycles(&uses) {
        let mut lines = vec![format!(
            "these files use each other: {}",
            component.iter().cloned().collect::<Vec<_>>().join(", ")
        )];
        for from in &component {
            for (to, line) in &uses[from] {
                if component.contains(to) {
                    lines.push(format!("  {from}:{line} uses {to}"));
                }
            }
        }
        problems.push(lines.join("\n"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// The library's source files: everything under `src/` except the binaries'
/// (`main.rs`, `bin/`), whose `crate` is another crate.
fn library_files(src: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "main.rs")
            {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(src, &mut out);
    out.sort();
    assert!(out.len() > 10, "no library files found under {src:?}");
    out
}

/// `src/db/outbox.rs` → `["db", "outbox"]`; `lib.rs` and `mod.rs` name
/// their directory.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

fn display(file: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    file.strip_prefix(root)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The module files a file's paths name, each with the line of its first use.
fn file_uses(
    module: &[String],
    text: &str,
    modules: &BTreeMap<Vec<String>, String>,
) -> Vec<(String, usize)> {
    let tokens = tokens(text);
    let mut out = Vec::new();
    // Modules brought into scope by name (`use crate::db::{self, …}` makes
    // `db::connect` a path into `db`), for the whole file: test modules
    // glob-import their parent's.
    let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Inline modules (`mod tests { … }`) change what `super` and `self` mean.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        let here: Vec<String> = module
            .iter()
            .cloned()
            .chain(inline.iter().map(|(name, _)| name.clone()))
            .collect();
        if is_cfg_test(&tokens[i..]) {
            i = item_end(&tokens, i + 7);
            continue;
        }
        match &tokens[i].kind {
            Kind::Punct('{') => depth += 1,
            Kind::Punct('}') => {
                depth -= 1;
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Kind::Ident(word) if word == "mod" => {
                if let (Some(Kind::Ident(name)), Some(Kind::Punct('{'))) = (
                    tokens.get(i + 1).map(|t| &t.kind),
                    tokens.get(i + 2).map(|t| &t.kind),
                ) {
                    inline.push((name.clone(), depth));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            Kind::Ident(word) if word == "use" => {
                let end = tokens[i..]
                    .iter()
                    .position(|t| t.kind == Kind::Punct(';'))
                    .map_or(tokens.len(), |p| i + p);
                for path in use_paths(&tokens[i + 1..end]) {
                    let Some(target) = absolute(&here, &path, modules, &aliases) else {
                        continue;
                    };
                    if modules.contains_key(&target)
                        && let Some(name) = target.last()
                    {
                        aliases.insert(name.clone(), target.clone());
                    }
                    if let Some(file) = file_of(&target, modules) {
                        out.push((file, tokens[i].line));
                    }
                }
                i = end;
                continue;
            }
            Kind::Ident(_) if tokens.get(i + 1).is_some_and(|t| t.kind == Kind::PathSep) => {
                let starts_path = i == 0 || tokens[i - 1].kind != Kind::PathSep;
                if starts_path {
                    let mut path = Vec::new();
                    let mut j = i;
                    while let Some(Kind::Ident(segment)) = tokens.get(j).map(|t| &t.kind) {
                        path.push(segment.clone());
                        if tokens.get(j + 1).is_some_and(|t| t.kind == Kind::PathSep) {
                            j += 2;
                        } else {
                            break;
                        }
                    }
                    if let Some(file) = absolute(&here, &path, modules, &aliases)
                        .and_then(|target| file_of(&target, modules))
                    {
                        out.push((file, tokens[i].line));
                    }
                    i = j + 1;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Whether the tokens start with `#[cfg(test)]`.
fn is_cfg_test(tokens: &[Token]) -> bool {
    let words = ["#", "[", "cfg", "(", "test", ")", "]"];
    tokens.len() >= words.len()
        && tokens
            .iter()
            .zip(words)
            .all(|(token, word)| match &token.kind {
                Kind::Ident(ident) => ident == word,
                Kind::Punct(c) => word.len() == 1 && word.starts_with(*c),
                Kind::PathSep => false,
            })
}

/// The index after the item that starts at `start`: past its first `;`, or
/// past the block its first `{` opens, whichever comes first.
fn item_end(tokens: &[Token], start: usize) -> usize {
    let mut depth = 0;
    for (i, token) in tokens.iter().enumerate().skip(start) {
        match token.kind {
            Kind::Punct(';') if depth == 0 => return i + 1,
            Kind::Punct('{') => depth += 1,
            Kind::Punct('}') => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    tokens.len()
}

/// The paths of a `use` tree (the tokens between `use` and `;`), groups
/// expanded: `crate::db::{self, outbox::Outbox}` → `crate::db::self`,
/// `crate::db::outbox::Outbox`.
fn use_paths(tokens: &[Token]) -> Vec<Vec<String>> {
    fn tree(tokens: &[Token], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        while let Some(token) = tokens.get(*i) {
            match &token.kind {
                Kind::Ident(word) if word == "as" => {
                    *i += 2;
                    break;
                }
                Kind::Ident(segment) => {
                    path.push(segment.clone());
                    *i += 1;
                }
                Kind::PathSep => *i += 1,
                Kind::Punct('{') => {
                    *i += 1;
                    loop {
                        tree(tokens, i, &path, out);
                        match tokens.get(*i).map(|t| &t.kind) {
                            Some(Kind::Punct(',')) => *i += 1,
                            Some(Kind::Punct('}')) => {
                                *i += 1;
                                return;
                            }
                            _ => return,
                        }
                        if tokens.get(*i).is_some_and(|t| t.kind == Kind::Punct('}')) {
                            *i += 1;
                            return;
                        }
                    }
                }
                _ => break,
            }
        }
        if path.len() > prefix.len() {
            out.push(path);
        }
    }
    // `pub use`, `pub(crate) use` put their words before `use`; the tree
    // starts right after it.
    let mut out = Vec::new();
    let mut i = 0;
    tree(tokens, &mut i, &[], &mut out);
    out
}

/// A path's segments from the crate root (`self` and what follows it
/// dropped), when it starts at the crate, at a module or at one of the
/// library's modules in scope (a child, or a module a `use` named).
fn absolute(
    here: &[String],
    path: &[String],
    modules: &BTreeMap<Vec<String>, String>,
    aliases: &BTreeMap<String, Vec<String>>,
) -> Option<Vec<String>> {
    let (mut absolute, mut rest) = match path.first()?.as_str() {
        "crate" => (Vec::new(), &path[1..]),
        "self" => (here.to_vec(), &path[1..]),
        "super" => {
            let mut absolute = here.to_vec();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                absolute.pop()?;
                rest = &rest[1..];
            }
            (absolute, rest)
        }
        first => {
            let mut child = here.to_vec();
            child.push(first.to_owned());
            if modules.contains_key(&child) {
                (here.to_vec(), path)
            } else {
                (aliases.get(first)?.clone(), &path[1..])
            }
        }
    };
    while let Some((segment, tail)) = rest.split_first() {
        if segment == "self" {
            break;
        }
        absolute.push(segment.clone());
        rest = tail;
    }
    Some(absolute)
}

/// The deepest module file among a path's leading segments; the crate root
/// (`lib.rs`) only lists modules, so a path that names no module names none.
fn file_of(absolute: &[String], modules: &BTreeMap<Vec<String>, String>) -> Option<String> {
    (1..=absolute.len())
        .rev()
        .find_map(|n| modules.get(&absolute[..n]).cloned())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Ident(String),
    PathSep,
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    line: usize,
}

/// Rust source as identifiers, `::` and punctuation, without comments,
/// string, byte-string, raw-string and character literals, lifetimes and
/// numbers.
fn tokens(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\n' => {
                line += 1;
                i += 1;
            }
            '/' if at(i + 1) == '/' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if at(i + 1) == '*' => {
                let mut nesting = 0;
                loop {
                    if at(i) == '/' && at(i + 1) == '*' {
                        nesting += 1;
                        i += 2;
                    } else if at(i) == '*' && at(i + 1) == '/' {
                        nesting -= 1;
                        i += 2;
                        if nesting == 0 {
                            break;
                        }
                    } else if i >= chars.len() {
                        break;
                    } else {
                        if chars[i] == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                }
            }
            '"' => {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    if at(i) == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            'r' | 'b' | 'c' if is_raw_string(&chars, i) => {
                while chars[i] != 'r' {
                    i += 1;
                }
                i += 1;
                let hashes = chars[i..].iter().take_while(|&&h| h == '#').count();
                i += hashes + 1;
                let closing: Vec<char> = std::iter::once('"')
                    .chain(std::iter::repeat_n('#', hashes))
                    .collect();
                while i < chars.len() && !chars[i..].starts_with(&closing) {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
                i += closing.len();
            }
            'b' | 'c' if at(i + 1) == '"' || at(i + 1) == '\'' => i += 1,
            '\'' => {
                // A character literal ('x', '\n', '\u{7f}') or a lifetime ('a).
                if at(i + 1) == '\\' {
                    // The backslash and the escaped character, then up to the quote.
                    i += 3;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if at(i + 2) == '\'' {
                    i += 3;
                } else {
                    i += 1;
                    while at(i).is_alphanumeric() || at(i) == '_' {
                        i += 1;
                    }
                }
            }
            ':' if at(i + 1) == ':' => {
                out.push(Token {
                    kind: Kind::PathSep,
                    line,
                });
                i += 2;
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let word = word.strip_prefix("r#").unwrap_or(&word).to_owned();
                out.push(Token {
                    kind: Kind::Ident(word),
                    line,
                });
            }
            c if c.is_ascii_digit() => {
                while at(i).is_alphanumeric() || at(i) == '_' || at(i) == '.' && at(i + 1) != '.' {
                    i += 1;
                }
            }
            c if c.is_whitespace() => i += 1,
            c => {
                out.push(Token {
                    kind: Kind::Punct(c),
                    line,
                });
                i += 1;
            }
        }
    }
    out
}

/// Whether a raw string (`r"…"`, `r#"…"#`, `br"…"`, `cr"…"`) starts at `i`.
fn is_raw_string(chars: &[char], i: usize) -> bool {
    let mut j = i;
    if chars[j] == 'b' || chars[j] == 'c' {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return false;
    }
    j += 1;
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    chars.get(j) == Some(&'"') && (i == 0 || !is_word_char(chars[i - 1]))
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The strongly connected components of more than one file (Tarjan).
fn cycles(uses: &BTreeMap<String, BTreeMap<String, usize>>) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        uses: &'a BTreeMap<String, BTreeMap<String, usize>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, node: &'a str) {
        let n = s.index.len();
        s.index.insert(node, n);
        s.low.insert(node, n);
        s.stack.push(node);
        s.on_stack.insert(node);
        for next in s.uses.get(node).into_iter().flat_map(|m| m.keys()) {
            let next = next.as_str();
            if !s.index.contains_key(next) {
                visit(s, next);
                let low = s.low[node].min(s.low[next]);
                s.low.insert(node, low);
            } else if s.on_stack.contains(next) {
                let low = s.low[node].min(s.index[next]);
                s.low.insert(node, low);
            }
        }
        if s.low[node] == s.index[node] {
            let mut component = BTreeSet::new();
            while let Some(member) = s.stack.pop() {
                s.on_stack.remove(member);
                component.insert(member.to_owned());
                if member == node {
                    break;
                }
            }
            if component.len() > 1 {
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        uses,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for node in uses.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.out
}
