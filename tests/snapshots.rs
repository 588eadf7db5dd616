//! Snapshots of every `bmc emit` stage of every model in `models/`. A change to any
//! stage's text shows up here for review (`cargo insta review`).

use bmc::driver::{self, FileSource, Options};
use bmc::emit::{EmitError, EmitStage, Format, emit};
use std::path::{Path, PathBuf};

fn models() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("models");
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "bm")).collect();
    v.sort();
    assert!(!v.is_empty(), "no models in {}", dir.display());
    v
}

#[test]
fn every_stage_of_every_model() {
    for path in models() {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        // Relative to the repository, so snapshots do not depend on where it is checked out.
        let loaded = driver::load(path.to_str().unwrap(), &FileSource::Disk).unwrap_or_else(|d| panic!("{d}"));
        for stage in EmitStage::ALL {
            let text = match emit(&loaded, &Options::default(), stage, Format::Text) {
                Ok(text) => text,
                // Classifiers have no decode graph: the snapshot holds the reason.
                Err(EmitError::Usage(why)) if stage == EmitStage::Decode => why,
                Err(e) => panic!("{stem} {}: {e:?}", stage.name()),
            };
            insta::assert_snapshot!(format!("{stem}.{}", stage.name()), text);
        }
    }
}
