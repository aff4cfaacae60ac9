//! Real English text for prompts and fidelity runs: the license texts every Debian machine ships.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::llama::Model;

const LICENSE_DIR: &str = "/usr/share/common-licenses";
const LICENSES: [&str; 6] = ["GPL-3", "GPL-2", "Apache-2.0", "LGPL-2.1", "MPL-2.0", "GFDL-1.3"];

/// The default text: the license texts in LICENSE_DIR, concatenated (about 140 KB).
pub fn default_text() -> Result<String> {
    licenses(&LICENSES)
}

/// The licenses `names` in LICENSE_DIR, concatenated (those missing are skipped).
fn licenses(names: &[&str]) -> Result<String> {
    let mut text = String::new();
    for name in names {
        if let Ok(s) = std::fs::read_to_string(Path::new(LICENSE_DIR).join(name)) {
            text.push_str(&s);
            text.push('\n');
        }
    }
    if text.is_empty() {
        bail!("none of the license texts {} found under {LICENSE_DIR}; pass a text file with -f", names.join(", "));
    }
    Ok(text)
}

/// Licenses that are not in the default text, so that a profile calibrated on them is
/// evaluated on text it has not seen.
const CALIBRATION_LICENSES: [&str; 2] = ["MPL-1.1", "Artistic"];

/// The default calibration text (`dspark calibrate`, `dspark:autoB`): the licenses in
/// CALIBRATION_LICENSES, concatenated (about 33 KB).
pub fn calibration_text() -> Result<String> {
    licenses(&CALIBRATION_LICENSES)
}

pub fn load_text(path: Option<&Path>) -> Result<String> {
    match path {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read text file {}", p.display())),
        None => default_text(),
    }
}

/// Exactly `n` prompt tokens: BOS (if the model uses one) and then the text's tokens, repeated
/// as often as needed.
pub fn prompt_tokens(model: &Model, text: &str, n: usize) -> Result<Vec<i32>> {
    let with_bos = model.tokenize(text, true)?;
    let body = model.tokenize(text, false)?;
    if body.is_empty() {
        bail!("the text has no tokens");
    }
    let mut toks: Vec<i32> = with_bos.iter().take(with_bos.len() - body.len()).copied().collect();
    while toks.len() < n {
        let take = (n - toks.len()).min(body.len());
        toks.extend_from_slice(&body[..take]);
    }
    toks.truncate(n);
    Ok(toks)
}
