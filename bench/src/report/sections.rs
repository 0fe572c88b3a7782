//! The sections of `benchmarks.md` that only some runs measure (the scale
//! scenarios and the ordered drains): putting one into a file an earlier
//! run wrote, and carrying over, from that file, the ones this run did not
//! measure, so a quick run does not erase an hour-long one.

/// The optional sections' headings, in the order the file holds them.
pub(crate) const OPTIONAL: [&str; 4] = [
    "## History",
    "## Backlog",
    "## Distance",
    "## Ordered drains",
];

/// The section every optional one goes before.
const LAST: &str = "## Choosing the AMQP client";

/// Said under a carried section's heading.
const CARRIED: &str = "*Carried over from an earlier run, which measured it: the run that wrote the rest of \
     this file did not (rerun with this section's option to measure it again).*";

/// Where the section under `heading` starts and ends in `md` (up to the
/// next `## ` heading, or the end).
fn section_range(md: &str, heading: &str) -> Option<(usize, usize)> {
    let start = md.match_indices(heading).map(|(i, _)| i).find(|&i| {
        (i == 0 || md[..i].ends_with('\n')) && md[i + heading.len()..].starts_with('\n')
    })?;
    let body = start + heading.len();
    let end = md[body..].find("\n## ").map_or(md.len(), |i| body + i + 1);
    Some((start, end))
}

/// `md` with the section under `heading` replaced by `section` (which
/// starts with that heading); without one, `section` goes before the first
/// section that follows it in the file's order, or at the end.
pub(crate) fn put(md: &str, heading: &str, section: &str) -> String {
    if let Some((start, end)) = section_range(md, heading) {
        return format!("{}{section}{}", &md[..start], &md[end..]);
    }
    let later = OPTIONAL
        .iter()
        .skip_while(|&&h| h != heading)
        .skip(1)
        .chain([&LAST]);
    match later.filter_map(|h| section_range(md, h)).next() {
        Some((at, _)) => format!("{}{section}{}", &md[..at], &md[at..]),
        None => format!("{md}\n{section}"),
    }
}

/// `new` with every optional section it lacks taken from `old`, marked as
/// carried over.
pub(crate) fn carry_unmeasured(new: &str, old: &str) -> String {
    let mut md = new.to_owned();
    for heading in OPTIONAL {
        if section_range(&md, heading).is_some() {
            continue;
        }
        let Some((start, end)) = section_range(old, heading) else {
            continue;
        };
        let section = &old[start..end];
        let section = if section.contains(CARRIED) {
            section.to_owned()
        } else {
            format!("{heading}\n\n{CARRIED}{}", &section[heading.len()..])
        };
        md = put(&md, heading, &section);
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# B\n\n## Live latency\n\nx\n\n## Choosing the AMQP client\n\ny\n";

    #[test]
    fn a_new_section_goes_before_the_clients_and_replaces_an_older_one() {
        let once = put(FILE, "## Ordered drains", "## Ordered drains\n\nfirst\n\n");
        assert_eq!(
            once,
            "# B\n\n## Live latency\n\nx\n\n## Ordered drains\n\nfirst\n\n## Choosing the AMQP client\n\ny\n"
        );
        let twice = put(
            &once,
            "## Ordered drains",
            "## Ordered drains\n\nsecond\n\n",
        );
        assert_eq!(twice, once.replace("first", "second"));
        assert_eq!(
            put("# B\n", "## Ordered drains", "## Ordered drains\n\nz\n"),
            "# B\n\n## Ordered drains\n\nz\n"
        );
    }

    #[test]
    fn a_section_goes_before_the_optional_ones_that_follow_it() {
        let file = FILE.replace("## Choosing", "## Distance\n\nd\n\n## Choosing");
        let md = put(&file, "## History", "## History\n\nh\n\n");
        assert!(
            md.contains("x\n\n## History\n\nh\n\n## Distance\n\nd\n\n## Choosing"),
            "{md}"
        );
    }

    #[test]
    fn sections_this_run_did_not_measure_are_carried_over_once_and_marked() {
        let old = FILE.replace(
            "## Choosing",
            "## History\n\nold h\n\n## Distance\n\nold d\n\n## Choosing",
        );
        let new = FILE.replace("## Choosing", "## Distance\n\nnew d\n\n## Choosing");
        let md = carry_unmeasured(&new, &old);
        assert!(
            md.contains(&format!(
                "## History\n\n{CARRIED}\n\nold h\n\n## Distance\n\nnew d\n\n"
            )),
            "{md}"
        );
        assert!(!md.contains("old d"));
        // Carried again, it is marked once.
        assert_eq!(carry_unmeasured(&new, &md), md);
        // A heading's name inside a longer one is not that section.
        assert!(section_range("## Historyx\n", "## History").is_none());
    }
}
