//! Model discovery on temporary folders laid out like a Hugging Face cache, an A1111 installation,
//! a ComfyUI installation and a plain folder of checkpoints.

#![allow(clippy::unwrap_used)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use attend::pipeline::discovery::{
    discover, model_format, remember_recent, scan_folder, scan_hf_cache, ModelFormat, ModelOrigin,
    SearchLocations, RECENT_LIMIT,
};

fn touch(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"{}").unwrap();
}

fn hf_snapshot(root: &Path, repo: &str, revision: &str, pipeline: bool) -> PathBuf {
    let snapshot = root
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(revision);
    if pipeline {
        touch(&snapshot.join("model_index.json"));
    } else {
        touch(&snapshot.join("config.json"));
    }
    snapshot
}

#[test]
fn hugging_face_cache_lists_pipelines_at_refs_main() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    hf_snapshot(root, "org/old-and-new", "aaa", true);
    let main = hf_snapshot(root, "org/old-and-new", "bbb", true);
    touch(&root.join("models--org--old-and-new/refs/main"));
    std::fs::write(root.join("models--org--old-and-new/refs/main"), "bbb\n").unwrap();
    let only = hf_snapshot(root, "runwayml/stable-diffusion-v1-5", "ccc", true);
    hf_snapshot(root, "openai/clip-vit-large-patch14", "ddd", false);
    touch(&root.join("datasets--someone--data/snapshots/eee/model_index.json"));

    let models = scan_hf_cache(root);
    let found: Vec<(&str, &Path)> = models
        .iter()
        .map(|model| (model.name.as_str(), model.path.as_path()))
        .collect();
    assert_eq!(
        found,
        [
            ("org/old-and-new", main.as_path()),
            ("runwayml/stable-diffusion-v1-5", only.as_path()),
        ]
    );
    assert!(models
        .iter()
        .all(|model| model.format == ModelFormat::DiffusersFolder
            && model.origin == ModelOrigin::HuggingFaceCache(root.to_path_buf())));
}

#[test]
fn checkpoint_folders_list_files_and_diffusers_folders_one_level_deep() {
    let temp = tempfile::tempdir().unwrap();
    let webui = temp.path().join("stable-diffusion-webui");
    let checkpoints = webui.join("models/Stable-diffusion");
    touch(&checkpoints.join("v1-5-pruned-emaonly.safetensors"));
    touch(&checkpoints.join("SD2/v2-1_768-ema-pruned.safetensors"));
    touch(&checkpoints.join("old.ckpt"));
    touch(&checkpoints.join("v2-1_768-ema-pruned.yaml"));
    touch(&checkpoints.join("Put Stable Diffusion checkpoints here.txt"));
    touch(&checkpoints.join("a-diffusers-model/model_index.json"));
    touch(&checkpoints.join("deep/deeper/too-deep.safetensors"));

    // The installation's root is followed to its checkpoint folder.
    let models = scan_folder(&webui);
    let found: Vec<(&str, ModelFormat)> = models
        .iter()
        .map(|model| (model.name.as_str(), model.format))
        .collect();
    assert_eq!(
        found,
        [
            (
                "SD2/v2-1_768-ema-pruned.safetensors",
                ModelFormat::SingleFile
            ),
            ("a-diffusers-model", ModelFormat::DiffusersFolder),
            ("old.ckpt", ModelFormat::Pickle),
            ("v1-5-pruned-emaonly.safetensors", ModelFormat::SingleFile),
        ]
    );
    assert!(models
        .iter()
        .all(|model| model.origin == ModelOrigin::Folder(checkpoints.clone())));

    let comfy = temp.path().join("ComfyUI");
    touch(&comfy.join("models/checkpoints/sd_turbo.safetensors"));
    let models = scan_folder(&comfy);
    assert_eq!(models.len(), 1);
    assert_eq!(
        models[0].path,
        comfy.join("models/checkpoints/sd_turbo.safetensors")
    );

    // A diffusers folder given directly is itself the model; a missing folder has none.
    let single = scan_folder(&checkpoints.join("a-diffusers-model"));
    assert_eq!(single.len(), 1);
    assert!(scan_folder(&temp.path().join("missing")).is_empty());
    assert_eq!(model_format(&temp.path().join("missing")), None);
}

#[test]
fn locations_come_from_the_variables_home_and_extra_folders() {
    let home = PathBuf::from("/home/someone");
    let extra = [PathBuf::from("/more/models")];
    let list = std::env::join_paths(["/a/models", "/b/models"]).unwrap();
    let variables = |hub: Option<&'static str>, hf_home: Option<&'static str>| {
        let list = list.clone();
        move |name: &str| -> Option<OsString> {
            match name {
                "HF_HUB_CACHE" => hub.map(OsString::from),
                "HF_HOME" => hf_home.map(OsString::from),
                "ATTEND_MODEL_DIRS" => Some(list.clone()),
                _ => None,
            }
        }
    };
    let locations =
        SearchLocations::from_variables(variables(Some("/hub"), Some("/hf")), Some(&home), &extra);
    assert_eq!(locations.hf_caches, [PathBuf::from("/hub")]);
    assert_eq!(
        locations.folders,
        [
            home.join("stable-diffusion-webui/models/Stable-diffusion"),
            home.join("ComfyUI/models/checkpoints"),
            PathBuf::from("/a/models"),
            PathBuf::from("/b/models"),
            PathBuf::from("/more/models"),
        ]
    );
    let locations = SearchLocations::from_variables(variables(None, Some("/hf")), Some(&home), &[]);
    assert_eq!(locations.hf_caches, [PathBuf::from("/hf/hub")]);
    let locations = SearchLocations::from_variables(variables(Some(""), None), Some(&home), &[]);
    assert_eq!(locations.hf_caches, [home.join(".cache/huggingface/hub")]);
    let locations = SearchLocations::from_variables(|_| None, None, &[]);
    assert_eq!(locations, SearchLocations::default());
}

#[test]
fn discovery_puts_recent_models_first_and_lists_each_path_once() {
    let temp = tempfile::tempdir().unwrap();
    let folder = temp.path().join("checkpoints");
    let a = folder.join("a.safetensors");
    let b = folder.join("b.safetensors");
    touch(&a);
    touch(&b);
    let hub = temp.path().join("hub");
    let snapshot = hf_snapshot(&hub, "org/model", "rev", true);
    let gone = temp.path().join("deleted.safetensors");
    let locations = SearchLocations {
        hf_caches: vec![hub],
        folders: vec![folder.clone(), folder.clone()],
    };
    let models = discover(&locations, &[b.clone(), gone]);
    let found: Vec<(&Path, &ModelOrigin)> = models
        .iter()
        .map(|model| (model.path.as_path(), &model.origin))
        .collect();
    assert_eq!(
        found,
        [
            (b.as_path(), &ModelOrigin::Recent),
            (
                snapshot.as_path(),
                &ModelOrigin::HuggingFaceCache(temp.path().join("hub"))
            ),
            (a.as_path(), &ModelOrigin::Folder(folder.clone())),
        ]
    );
}

#[test]
fn recent_models_move_to_the_front_and_are_bounded() {
    let mut recent = Vec::new();
    for index in 0..RECENT_LIMIT + 3 {
        remember_recent(&mut recent, Path::new(&format!("/m/{index}")));
    }
    assert_eq!(recent.len(), RECENT_LIMIT);
    assert_eq!(recent[0], PathBuf::from(format!("/m/{}", RECENT_LIMIT + 2)));
    remember_recent(&mut recent, Path::new("/m/5"));
    assert_eq!(recent[0], PathBuf::from("/m/5"));
    assert_eq!(recent.len(), RECENT_LIMIT);
    assert_eq!(recent.iter().filter(|path| path.ends_with("5")).count(), 1);
}

/// `attend models` lists what it finds in the Hugging Face cache, the A1111 folder under `HOME`,
/// `ATTEND_MODEL_DIRS` and `--search-dir`, and refuses a search folder that does not exist.
#[test]
fn attend_models_lists_the_models_it_finds() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    touch(&home.join("stable-diffusion-webui/models/Stable-diffusion/a1111.safetensors"));
    let hub = temp.path().join("hub");
    hf_snapshot(&hub, "org/cached", "rev", true);
    let listed = temp.path().join("listed");
    touch(&listed.join("from-variable.safetensors"));
    let extra = temp.path().join("extra");
    touch(&extra.join("from-flag.ckpt"));
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_attend"))
            .arg("models")
            .args(args)
            .env("HOME", &home)
            .env("HF_HUB_CACHE", &hub)
            .env_remove("HF_HOME")
            .env("ATTEND_MODEL_DIRS", &listed)
            .output()
            .unwrap()
    };
    let output = run(&["--search-dir", extra.to_str().unwrap(), "--json"]);
    assert!(output.status.success());
    let names: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["name"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "org/cached",
            "a1111.safetensors",
            "from-variable.safetensors",
            "from-flag.ckpt"
        ]
    );
    let output = run(&["--search-dir", "/no/such/folder"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("/no/such/folder"), "{stderr}");
}
