//! What lessnat prints about itself: the spec's JSON Schema, shell
//! completions, the man page. Each is rendered whole, then written, so a
//! closed standard output is one failed write (clap_complete would panic).

use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use super::print;
use crate::cli::Cli;
use crate::schema::spec_schema_json;

/// `lessnat schema`.
pub fn schema() -> anyhow::Result<ExitCode> {
    print(spec_schema_json().context("serialising the JSON Schema")?)?;
    Ok(ExitCode::SUCCESS)
}

/// `lessnat completions SHELL`.
pub fn completions(shell: Shell) -> anyhow::Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "lessnat", &mut script);
    print(script)?;
    Ok(ExitCode::SUCCESS)
}

/// `lessnat man`: one page, dated today, that describes every command in
/// itself (there are no per-command pages to refer to).
pub fn man() -> anyhow::Result<ExitCode> {
    print(man_page().context("rendering the man page")?)?;
    Ok(ExitCode::SUCCESS)
}

/// The man page in roff.
fn man_page() -> std::io::Result<Vec<u8>> {
    let command = Cli::command();
    let today = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let man = clap_mangen::Man::new(command.clone())
        .title("LESSNAT")
        .date(today.get(..10).unwrap_or_default());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    page.extend_from_slice(b".SH COMMANDS\n");
    for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
        let about = sub
            .get_long_about()
            .or(sub.get_about())
            .map(ToString::to_string)
            .unwrap_or_default();
        // Paragraphs stay indented under the command (.IP); a line that
        // starts like a roff request is escaped.
        let text = about
            .replace('\\', "\\\\")
            .split("\n\n")
            .map(|paragraph| {
                paragraph
                    .lines()
                    .map(|line| match line.starts_with(['.', '\'']) {
                        true => format!("\\&{line}\n"),
                        false => format!("{line}\n"),
                    })
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join(".IP\n");
        page.extend_from_slice(
            format!(".TP\n\\fBlessnat {}\\fR\n{text}", sub.get_name()).as_bytes(),
        );
    }
    page.extend_from_slice(b".PP\nEach command's options: \\fBlessnat COMMAND --help\\fR.\n");
    man.render_extra_section(&mut page)?;
    man.render_version_section(&mut page)?;
    Ok(page)
}
