//! Experiment spec errors name the file, line, column and field; bad settings are rejected
//! before training starts.
use moz_lab::lab::spec::ExperimentSpec;
use std::path::Path;

const GOOD: &str = r#"
seeds = [0]
device = "cpu"

[model]
d_model = 32
n_layer = 2
headdim = 16
d_state = 8
chunk_size = 16

[train]
steps = 10
batch_size = 2
seq_len = 32

[[variants]]
name = "dense"
preset = "mamba2"

[[variants]]
name = "moz"
preset = "moz"
experts = 4
"#;

fn parse(text: &str) -> Result<ExperimentSpec, moz_lab::lab::spec::SpecError> {
    ExperimentSpec::parse(Path::new("experiments/t.toml"), text, &[])
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn good_spec_expands_to_runs() {
    let spec = parse(GOOD).unwrap();
    let runs = spec.runs(Path::new("runs")).unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].model.sparsity.experts, 4);
    assert_eq!(runs[1].out_dir, Path::new("runs/t/moz"));
}

#[test]
fn unknown_key_names_line_and_key() {
    let text = GOOD.replace("seq_len = 32", "seq_len = 32\nlearning_rate = 0.1");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.line, line_of(&text, "learning_rate"));
    assert!(e.message.contains("learning_rate"), "{e}");
    assert!(e.to_string().starts_with("experiments/t.toml:"), "{e}");
}

#[test]
fn top_k_larger_than_experts_points_at_the_variant_field() {
    let text = GOOD.replace("experts = 4", "experts = 4\ntop_k = 5");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.field, "variants[1].top_k");
    assert_eq!(e.line, line_of(&text, "top_k = 5"));
    assert!(e.message.contains("larger than experts"), "{e}");
}

#[test]
fn headdim_not_dividing_d_inner_is_rejected() {
    let text = GOOD.replace("headdim = 16", "headdim = 24");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.field, "model.headdim");
    assert_eq!(e.line, line_of(&text, "headdim = 24"));
    assert!(e.message.contains("not divisible"), "{e}");
}

#[test]
fn seq_len_larger_than_data_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("small.txt"), "just a few bytes of text").unwrap();
    let text =
        format!("{GOOD}\n[data]\nkind = \"text\"\npath = \"small.txt\"\nval_fraction = 0.5\n");
    let path = dir.path().join("s.toml");
    std::fs::write(&path, &text).unwrap();
    let e = ExperimentSpec::load(&path).unwrap_err();
    assert_eq!(e.field, "train.seq_len");
    assert_eq!(e.line, line_of(&text, "seq_len = 32"));
}

#[test]
fn empty_corpus_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.txt"), "").unwrap();
    let text = format!("{GOOD}\n[data]\nkind = \"text\"\npath = \"empty.txt\"\n");
    let path = dir.path().join("s.toml");
    std::fs::write(&path, &text).unwrap();
    let e = ExperimentSpec::load(&path).unwrap_err();
    assert_eq!(e.field, "data.path");
    assert!(e.message.contains("empty"), "{e}");
}

#[test]
fn unknown_preset_and_projection_list_allowed_values() {
    let e = parse(&GOOD.replace("preset = \"moz\"", "preset = \"mox\"")).unwrap_err();
    assert!(e.message.contains("mol-except-z"), "{e}");
    let text = GOOD.replace("preset = \"moz\"", "sparsify = [\"z\", \"w\"]");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.line, line_of(&text, "sparsify"));
    assert!(
        e.message.contains("\"w\"") && e.message.contains("dt"),
        "{e}"
    );
}

#[test]
fn bad_values_are_located() {
    let text = GOOD.replace("steps = 10", "steps = 0");
    let e = parse(&text).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.line),
        ("train.steps", line_of(&text, "steps = 0"))
    );
    let text = GOOD.replace("device = \"cpu\"", "device = \"tpu\"");
    let e = parse(&text).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.line),
        ("device", line_of(&text, "tpu"))
    );
    let text = GOOD.replace("experts = 4", "match_total = 2.0\nexperts = 4");
    assert!(parse(&text).unwrap_err().message.contains("not both"));
    let text = GOOD.replace("n_layer = 2", "n_layer = 3\npattern = \"MF\"");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.field, "model.pattern");
    let e = parse("seeds = [0]\n[[variants]]\nname = \"x\"\n").unwrap_err();
    assert!(e.message.contains("preset"), "{e}");
}

#[test]
fn syntax_error_has_position() {
    let e = parse("seeds = [0\n").unwrap_err();
    assert!(e.line >= 1 && e.column >= 1, "{e}");
}

#[test]
fn overrides_apply_and_match_total_solves_experts() {
    let text = GOOD.replace("experts = 4", "match_total = 2.0");
    let spec = ExperimentSpec::parse(
        Path::new("t.toml"),
        &text,
        &["train.steps=7".into(), "model.d_model=64".into()],
    )
    .unwrap();
    assert_eq!(spec.file.train.steps, 7);
    let cfg = spec.resolve_model(1).unwrap();
    assert_eq!(cfg.d_model, 64);
    assert!(cfg.sparsity.experts >= 2);
}

#[test]
fn shipped_experiments_parse() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/experiments")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            ExperimentSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
