//! Checks the subcommands make before any work: whole-number flags that accept negative input (so
//! `--steps -5` says "must be at least 1" rather than clap's "unexpected argument"), analysis
//! errors reported with their flag, output folders made only when there is something to write, and
//! prompt words the model does not know.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use attend::analysis::export::export_destination;
use attend::analysis::AnalysisError;

/// Any whole number as `i128`; digits beyond its range are "too large (at most `max`)" or, with a
/// minus sign, the most negative value (which every caller refuses as negative).
fn whole_number(text: &str, max: u128) -> Result<i128, String> {
    let text = text.trim();
    if let Ok(value) = text.parse::<i128>() {
        return Ok(value);
    }
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err("not a whole number".to_string());
    }
    if negative {
        Ok(i128::MIN)
    } else {
        Err(format!("too large (at most {max})"))
    }
}

/// Clap value parser of counts that must be at least 1 (`--steps`, `--k`, `--n-init`, ...). Reads
/// any integer, so a negative one gets the range message rather than clap's "unexpected argument".
pub fn at_least_one(text: &str) -> Result<usize, String> {
    let value = whole_number(text, usize::MAX as u128)?;
    if value < 1 {
        return Err("must be at least 1".to_string());
    }
    usize::try_from(value).map_err(|_| format!("too large (at most {})", usize::MAX))
}

/// Clap value parser of seeds and other whole numbers that must be 0 or more.
pub fn non_negative(text: &str) -> Result<u64, String> {
    let value = whole_number(text, u128::from(u64::MAX))?;
    if value < 0 {
        return Err("must be 0 or more".to_string());
    }
    u64::try_from(value).map_err(|_| format!("too large (at most {})", u64::MAX))
}

/// An analysis error about a segmentation setting, with the setting named by its flag.
pub fn segmentation_flag_error(error: AnalysisError) -> anyhow::Error {
    let AnalysisError::InvalidArgument { name, reason } = error;
    let flag = match name {
        "k" => "--k",
        "n_init" => "--n-init",
        "merge fraction" => "--merge-fraction",
        "min segment fraction" => "--min-segment-fraction",
        "kl threshold" => "--kl-threshold",
        "kl relative" => "--kl-relative",
        "passes" => "--passes",
        "label threshold" => "--label-threshold",
        "dilate px" => "--dilate-px",
        "feather px" => "--feather-px",
        other => other,
    };
    anyhow::anyhow!("invalid {flag}: {reason}")
}

/// An output folder (`--out-dir`, `--images-out`, ...), checked before a run and created only when
/// the first file is about to be written. The folders this run created are removed again when the
/// run fails before [`OutDir::keep`] and they are still empty, so a failure leaves no empty folder
/// behind (and never removes a file).
pub struct OutDir {
    path: PathBuf,
    flag: &'static str,
    /// The topmost folder this run created (the folder itself or a missing ancestor of it).
    created: Option<PathBuf>,
    kept: bool,
}

impl OutDir {
    /// Checks that `path` is a folder or can be made one: an existing path must be a folder, the
    /// nearest existing ancestor must be a writable folder. Nothing is created yet.
    pub fn check(flag: &'static str, path: &Path) -> anyhow::Result<Self> {
        match std::fs::metadata(path) {
            Ok(metadata) => anyhow::ensure!(
                metadata.is_dir(),
                "{flag} {}: it exists and is not a folder",
                path.display()
            ),
            Err(_) => {
                let ancestor = path
                    .ancestors()
                    .skip(1)
                    .map(|ancestor| {
                        if ancestor.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            ancestor
                        }
                    })
                    .find(|ancestor| std::fs::symlink_metadata(ancestor).is_ok())
                    .unwrap_or(Path::new("."));
                let metadata = std::fs::metadata(ancestor).with_context(|| {
                    format!(
                        "{flag} {}: cannot read {}",
                        path.display(),
                        ancestor.display()
                    )
                })?;
                anyhow::ensure!(
                    metadata.is_dir(),
                    "{flag} {}: {} is not a folder",
                    path.display(),
                    ancestor.display()
                );
                anyhow::ensure!(
                    !metadata.permissions().readonly(),
                    "{flag} {}: folder {} is read-only",
                    path.display(),
                    ancestor.display()
                );
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            flag,
            created: None,
            kept: false,
        })
    }

    /// Checks, before a run, that the files `names` could be written into the folder: none of them
    /// is a folder, device, FIFO or socket already there ([`check_output_file`]'s rule).
    pub fn check_files(&self, names: &[&str]) -> anyhow::Result<()> {
        if self.path.is_dir() {
            for name in names {
                export_destination(&self.path.join(name))
                    .with_context(|| format!("{} {}", self.flag, self.path.display()))?;
            }
        }
        Ok(())
    }

    /// Creates the folder (and its missing parents) if needed; returns its path.
    pub fn create(&mut self) -> anyhow::Result<&Path> {
        if !self.path.is_dir() {
            let topmost_missing = self
                .path
                .ancestors()
                .take_while(|ancestor| {
                    !ancestor.as_os_str().is_empty() && std::fs::symlink_metadata(ancestor).is_err()
                })
                .last()
                .map(Path::to_path_buf);
            std::fs::create_dir_all(&self.path)
                .with_context(|| format!("cannot create {} {}", self.flag, self.path.display()))?;
            if self.created.is_none() {
                self.created = topmost_missing;
            }
        }
        Ok(&self.path)
    }

    /// The run succeeded: the folder stays.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        let (Some(created), false) = (&self.created, self.kept) else {
            return;
        };
        // Only the empty folders this run made: files already written (complete, each written
        // atomically) stay, and so does every folder that was there before.
        for folder in self.path.ancestors() {
            if std::fs::remove_dir(folder).is_err() || folder == created.as_path() {
                break;
            }
        }
    }
}

/// Fails before a run when an output file could not be written: its folder is missing or
/// read-only, or the path is a folder, device, FIFO or socket ([`export_destination`]).
pub fn check_output_file(flag: &str, path: &Path) -> anyhow::Result<()> {
    let destination = export_destination(path).with_context(|| flag.to_string())?;
    let parent = match destination.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let metadata = std::fs::metadata(parent).with_context(|| {
        format!(
            "{flag}: cannot write {}: folder {} does not exist",
            path.display(),
            parent.display()
        )
    })?;
    anyhow::ensure!(
        metadata.is_dir(),
        "{flag}: cannot write {}: {} is not a folder",
        path.display(),
        parent.display()
    );
    anyhow::ensure!(
        !metadata.permissions().readonly(),
        "{flag}: cannot write {}: folder {} is read-only",
        path.display(),
        parent.display()
    );
    Ok(())
}

/// The prompt words the model does not know: every token of the word is the tokenizer's unknown
/// token (`<unk>` for word-level vocabularies such as the bundled model's; CLIP's byte-level BPE
/// spells everything, and uses its end token for the unknown).
pub fn unknown_words(
    tokens: &attend::pipeline::tokenizer::PromptTokens,
    end_token: &str,
) -> Vec<String> {
    tokens
        .words
        .iter()
        .filter(|word| {
            !word.token_indices.is_empty()
                && word.token_indices.iter().all(|&index| {
                    tokens
                        .tokens
                        .get(index)
                        .is_some_and(|token| token == "<unk>" || token == end_token)
                })
        })
        .map(|word| word.text.clone())
        .collect()
}

/// Prints a warning for every word of `prompt` the model does not know (see [`unknown_words`]).
pub fn warn_unknown_words(
    model: &attend::pipeline::model::StableDiffusion,
    flag: &str,
    prompt: &str,
) -> anyhow::Result<()> {
    let tokens = model.tokenizer.encode_prompt(prompt)?;
    let unknown = unknown_words(&tokens, &model.tokenizer.end_token().text);
    if !unknown.is_empty() {
        eprintln!(
            "warning: {flag}: the model {} does not know {} (each became its unknown token): \
             they steer the image like any unknown word and their attention maps mean little",
            model.name(),
            unknown
                .iter()
                .map(|word| format!("{word:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_seeds_parse_negative_input_into_a_range_message() {
        assert_eq!(at_least_one("3"), Ok(3));
        assert!(at_least_one("-5").unwrap_err().contains("at least 1"));
        assert!(at_least_one("0").unwrap_err().contains("at least 1"));
        assert!(at_least_one("many").unwrap_err().contains("whole number"));
        assert!(at_least_one("1e3").unwrap_err().contains("whole number"));
        assert!(at_least_one(&"9".repeat(50))
            .unwrap_err()
            .contains("too large"));
        assert!(at_least_one(&format!("-{}", "9".repeat(50)))
            .unwrap_err()
            .contains("at least 1"));
        assert_eq!(non_negative("0"), Ok(0));
        assert!(non_negative("-1").unwrap_err().contains("0 or more"));
        assert!(non_negative("18446744073709551616")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn out_dir_is_made_late_and_removed_on_failure() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("a").join("b");
        let mut out = OutDir::check("--out-dir", &path).unwrap();
        assert!(!path.exists(), "not made by the check");
        out.create().unwrap();
        assert!(path.is_dir());
        drop(out);
        assert!(!path.exists(), "removed when the run did not keep it");
        assert!(!root.path().join("a").exists(), "with the parents it made");

        // A folder holding a file written before the failure stays.
        let mut out = OutDir::check("--out-dir", &path).unwrap();
        std::fs::write(out.create().unwrap().join("image.png"), "x").unwrap();
        drop(out);
        assert!(path.join("image.png").is_file());
        std::fs::remove_dir_all(root.path().join("a")).unwrap();

        let mut out = OutDir::check("--out-dir", &path).unwrap();
        out.create().unwrap();
        out.keep();
        assert!(path.is_dir());

        // A folder that was there before is never removed.
        let out = OutDir::check("--out-dir", root.path()).unwrap();
        drop(out);
        assert!(root.path().is_dir());

        // A name the run writes is taken by a folder.
        std::fs::create_dir(root.path().join("image.png")).unwrap();
        let out = OutDir::check("--out-dir", root.path()).unwrap();
        let error = out.check_files(&["labels.png", "image.png"]).unwrap_err();
        assert!(format!("{error:#}").contains("a folder"), "{error:#}");
        out.check_files(&["labels.png"]).unwrap();

        let file = root.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let error = OutDir::check("--out-dir", &file).err().unwrap();
        assert!(error.to_string().contains("not a folder"), "{error}");
        let error = OutDir::check("--out-dir", &file.join("below"))
            .err()
            .unwrap();
        assert!(error.to_string().contains("not a folder"), "{error}");
    }
}
