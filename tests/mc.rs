//! Zero-shot multiple choice (`moz-lab eval-mc`): prompt construction per dataset format, the
//! scorer against log-likelihoods summed by hand, acc vs acc_norm, errors and the command line.
use candle_core::{DType, Device, Module, Tensor};
mod common;
use common::tiny;
use moz_lab::model::{MambaLm, ModelConfig, Projection};
use moz_lab::train::checkpoint::{self, CheckpointFiles, TrainerState};
use moz_lab::train::mc::{
    choice_loglikelihoods, choice_loglikelihoods_with, evaluate, evaluate_with, load_items, pick,
    score_requests, McItem, McOptions, McTask,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mc")
        .join(name)
}

fn item(task: McTask, context: &str, choices: &[&str], gold: usize) -> McItem {
    McItem {
        task,
        context: context.into(),
        choices: choices.iter().map(|c| c.to_string()).collect(),
        gold,
    }
}

// ------------------------------------------------------------------------------------------
// Loading
// ------------------------------------------------------------------------------------------

#[test]
fn arc_items_from_both_formats() {
    let items = load_items(McTask::Arc, &fixture("arc.jsonl")).unwrap();
    let t = McTask::Arc;
    let expected = vec![
        item(
            t,
            "Question: Which tool is best for measuring the mass of a small stone?\nAnswer:",
            &[" a ruler", " a balance", " a thermometer", " a stopwatch"],
            1,
        ),
        // Numeric labels: gold is the index of answerKey among the labels.
        item(
            t,
            "Question: What happens to water when it freezes?\nAnswer:",
            &[" It becomes a solid.", " It becomes a gas.", " It disappears."],
            0,
        ),
        // The original AI2 format (question.stem, question.choices[]); the blank line is skipped.
        item(
            t,
            "Question: Which of these gives off its own light?\nAnswer:",
            &[" the Moon", " the Sun", " a mirror"],
            1,
        ),
        item(
            t,
            "Question: A seedling on a windowsill bends toward the glass. This response is called\nAnswer:",
            &[" phototropism", " gravitropism", " thigmotropism", " hydrotropism", " photosynthèse"],
            0,
        ),
    ];
    assert_eq!(items, expected);
    // acc_norm lengths: characters of the choice without the delimiter (è is one character).
    assert_eq!(items[3].norm_lens(), vec![12, 12, 13, 12, 13]);
}

#[test]
fn hellaswag_items_are_preprocessed_like_the_harness() {
    let items = load_items(McTask::Hellaswag, &fixture("hellaswag.jsonl")).unwrap();
    let t = McTask::Hellaswag;
    let expected = vec![
        // " [title]" -> ". ", [header] / [step] / [substeps] removed, double spaces collapsed,
        // ctx_b capitalised the Python way (first char upper, the rest lower: NEW -> new),
        // endings stripped. "[title]" without a space before it is only removed, leaving the
        // space after it: two spaces after the delimiter, as the harness scores it.
        item(
            t,
            "Home and Garden: How to repot a fern. Choose a slightly larger pot. the new pot should have drainage holes",
            &[
                " and a saucer underneath. Water drains away from the roots.",
                " made of glass so you can watch the roots.",
                "  Fill the pot with soil. Press it down gently.",
                " that you paint BLUE first.",
            ],
            0,
        ),
        // Integer label; "he" -> "He"; three spaces -> two (one pass of replace("  ", " ")).
        item(
            t,
            "Washing dishes: A man stands at a sink full of plates. He",
            &[
                " rinses each plate and sets it on a rack.",
                " throws the plates  out the window.",
                " starts singing into a spoon.",
                " turns into a sink.",
            ],
            0,
        ),
        // Empty ctx_b: the trailing space is stripped.
        item(
            t,
            "Playing guitar: A girl tunes a guitar on a stage",
            &[
                " and the crowd claps.",
                " then eats the guitar.",
                " then she plays a short song for the crowd.",
                " and the stage floats away.",
            ],
            2,
        ),
    ];
    assert_eq!(items, expected);
}

#[test]
fn siqa_items() {
    let items = load_items(McTask::Siqa, &fixture("siqa.jsonl")).unwrap();
    let t = McTask::Siqa;
    let expected = vec![
        item(
            t,
            "Q: Mara baked bread for her neighbors after the storm. Why did Mara do this?\nA:",
            &[
                " to help people nearby",
                " to sell the bread",
                " to practice cooking",
            ],
            0,
        ),
        item(
            t,
            "Q: Theo forgot his friend's birthday. How would Theo feel afterwards?\nA:",
            &[" proud", " guilty", " ready for a café"],
            1,
        ),
        item(
            t,
            "Q: Ines left the meeting early without a word. What will others want to do next?\nA:",
            &[
                " give her a prize",
                " ignore the rest of the day",
                " ask her if everything is fine",
            ],
            2,
        ),
    ];
    assert_eq!(items, expected);
    // "ready for a café": 16 characters, 17 bytes.
    assert_eq!(items[1].norm_lens(), vec![5, 6, 16]);
}

#[test]
fn task_names_parse() {
    assert_eq!("arc".parse::<McTask>().unwrap(), McTask::Arc);
    assert_eq!("ARC_Challenge".parse::<McTask>().unwrap(), McTask::Arc);
    assert_eq!("hellaswag".parse::<McTask>().unwrap(), McTask::Hellaswag);
    assert_eq!("social_iqa".parse::<McTask>().unwrap(), McTask::Siqa);
    let e = "piqa".parse::<McTask>().unwrap_err().to_string();
    assert!(
        e.contains("piqa") && e.contains("arc, hellaswag, siqa"),
        "{e}"
    );
    assert_eq!(McTask::Hellaswag.to_string(), "hellaswag");
}

fn load_err(task: McTask, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, text).unwrap();
    let e = load_items(task, &path).unwrap_err();
    format!("{e:#}").replace(&path.display().to_string(), "FILE")
}

#[test]
fn malformed_lines_name_file_line_and_field() {
    let good = r#"{"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "1"}"#;
    let e = load_err(
        McTask::Siqa,
        &format!("{good}\n{}\n", good.replace(r#""answerB": "b", "#, "")),
    );
    assert!(e.starts_with("FILE:2: missing field \"answerB\""), "{e}");

    let e = load_err(McTask::Siqa, &format!("{good}\n\n{{\"context\": \n"));
    assert!(e.starts_with("FILE:3: invalid JSON"), "{e}");

    let e = load_err(McTask::Siqa, &good.replace(r#""1""#, r#""4""#));
    assert!(e.starts_with("FILE:1: field \"label\""), "{e}");

    let e = load_err(
        McTask::Siqa,
        &good.replace(r#""label": "1""#, r#""label": [1]"#),
    );
    assert!(
        e.starts_with("FILE:1: field \"label\": expected an integer"),
        "{e}"
    );

    let arc = r#"{"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "C"}"#;
    let e = load_err(McTask::Arc, arc);
    assert!(e.starts_with("FILE:1: field \"answerKey\": \"C\""), "{e}");
    let arc_ok = arc.replace(r#""answerKey": "C""#, r#""answerKey": "B""#);
    let e = load_err(
        McTask::Arc,
        &format!(
            "{arc_ok}\n{}",
            arc_ok.replace(r#", "label": ["A", "B"]"#, "")
        ),
    );
    assert!(
        e.starts_with("FILE:2: missing field \"choices.label\""),
        "{e}"
    );
    let e = load_err(
        McTask::Arc,
        r#"{"question": {"stem": "s", "choices": [{"text": "x"}]}, "answerKey": "A"}"#,
    );
    assert!(
        e.starts_with("FILE:1: missing field \"question.choices[0].label\""),
        "{e}"
    );

    let hs =
        r#"{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["d", 5], "label": "0"}"#;
    let e = load_err(McTask::Hellaswag, hs);
    assert!(
        e.starts_with("FILE:1: field \"endings[1]\": expected a string"),
        "{e}"
    );
    let hs_ok = hs.replace(r#", 5]"#, r#", "e"]"#);
    let e = load_err(
        McTask::Hellaswag,
        &hs_ok.replace(r#""label": "0""#, r#""label": """#),
    );
    assert!(e.starts_with("FILE:1: field \"label\""), "{e}");
}

// ------------------------------------------------------------------------------------------
// Scoring
// ------------------------------------------------------------------------------------------

/// Random-init logits are almost flat; larger weights make the scores differ by choice and
/// position, so a misplaced position or target shows.
fn model(cfg: &ModelConfig, seed: u64) -> MambaLm {
    let m = MambaLm::new(cfg, &Device::Cpu, DType::F64, seed).unwrap();
    for p in m.store.params() {
        let t = p.var.as_tensor();
        if t.rank() == 2 && p.name.contains("embedding") {
            p.var.set(&(t * 50.0).unwrap()).unwrap();
        }
    }
    m
}

/// log p(continuation | context) from one unbatched forward pass of the whole byte sequence,
/// log-softmax done here in f64: the bytes of `seq` at positions >= `ctx_len` are predicted from
/// the logits one position earlier.
fn by_hand(model: &MambaLm, seq: &[u8], ctx_len: usize) -> f64 {
    let ids: Vec<u32> = seq[..seq.len() - 1].iter().map(|&b| b as u32).collect();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let logits: Vec<Vec<f64>> = model
        .forward(&ids)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let _ = model.take_routing();
    let mut total = 0.0;
    for pos in ctx_len..seq.len() {
        let row = &logits[pos - 1];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        total += row[seq[pos] as usize] - lse;
    }
    total
}

fn configs() -> Vec<ModelConfig> {
    vec![
        tiny("M", vec![], 3, 1),
        // MoZ projections, an MoE MLP and attention: padding must not leak through any of them.
        tiny("MEA", vec![Projection::Z, Projection::X], 3, 1),
    ]
}

#[test]
fn choice_loglikelihoods_match_a_hand_summed_forward() {
    let items = load_items(McTask::Hellaswag, &fixture("hellaswag.jsonl")).unwrap();
    for (k, cfg) in configs().iter().enumerate() {
        let m = model(cfg, 7 + k as u64);
        for it in &items {
            let got = choice_loglikelihoods(&m, it).unwrap();
            assert_eq!(got.len(), it.choices.len());
            for (c, ll) in it.choices.iter().zip(&got) {
                let seq = format!("{}{}", it.context, c).into_bytes();
                let want = by_hand(&m, &seq, it.context.len());
                assert!(
                    (ll - want).abs() < 1e-9,
                    "{}: {ll} vs {want}",
                    cfg.layer_pattern
                );
            }
            // The choices must actually differ (the check above is not vacuous).
            assert!((got[0] - got[1]).abs() > 1e-3, "{got:?}");
        }
    }
}

#[test]
fn batching_and_order_do_not_change_scores() {
    let mut items = load_items(McTask::Arc, &fixture("arc.jsonl")).unwrap();
    items.extend(load_items(McTask::Siqa, &fixture("siqa.jsonl")).unwrap());
    let reqs: Vec<(&str, &str)> = items
        .iter()
        .flat_map(|it| it.choices.iter().map(|c| (it.context.as_str(), c.as_str())))
        .collect();
    let m = model(&configs()[1], 3);
    let one = McOptions {
        batch: 1,
        max_len: 2048,
    };
    let reference = score_requests(&m, &reqs, one, &mut |_, _| {}).unwrap();
    for batch in [2, 5, 64] {
        let mut calls = Vec::new();
        let got = score_requests(
            &m,
            &reqs,
            McOptions {
                batch,
                max_len: 2048,
            },
            &mut |d, t| calls.push((d, t)),
        )
        .unwrap();
        for (a, b) in got.iter().zip(&reference) {
            assert!((a - b).abs() < 1e-9, "batch {batch}: {a} vs {b}");
        }
        assert_eq!(calls.len(), reqs.len().div_ceil(batch));
        assert_eq!(*calls.last().unwrap(), (reqs.len(), reqs.len()));
    }
    // Spot-check the flat request list against the per-item API and the hand sum.
    let it = &items[5];
    let first = items[..5].iter().map(|i| i.choices.len()).sum::<usize>();
    let per_item = choice_loglikelihoods(&m, it).unwrap();
    for (j, ll) in per_item.iter().enumerate() {
        assert!((ll - reference[first + j]).abs() < 1e-9);
        let seq = format!("{}{}", it.context, it.choices[j]).into_bytes();
        assert!((ll - by_hand(&m, &seq, it.context.len())).abs() < 1e-9);
    }
}

#[test]
fn long_prompts_keep_their_last_max_len_plus_one_bytes() {
    let m = model(&configs()[0], 11);
    let it = item(
        McTask::Siqa,
        "Q: a rather long context that will not fit. Why?\nA:",
        &[" because", " no"],
        0,
    );
    let max_len = 12;
    let got = choice_loglikelihoods_with(&m, &it, McOptions { batch: 4, max_len }).unwrap();
    for (c, ll) in it.choices.iter().zip(&got) {
        let full = format!("{}{}", it.context, c).into_bytes();
        let window = &full[full.len() - (max_len + 1)..];
        let want = by_hand(&m, window, window.len() - c.len());
        assert!((ll - want).abs() < 1e-9, "{ll} vs {want}");
        let untruncated = by_hand(&m, &full, it.context.len());
        assert!((ll - untruncated).abs() > 1e-6, "truncation had no effect");
    }
    // A continuation longer than the window is an error, not a silent cut.
    let e = choice_loglikelihoods_with(
        &m,
        &it,
        McOptions {
            batch: 4,
            max_len: 5,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("max_len 5"), "{e}");
}

#[test]
fn pick_argmax_and_length_normalised_argmax() {
    // Choice 0 has the higher total, choice 1 the higher per-character score.
    assert_eq!(pick(&[-10.0, -12.0, -30.0], &[5, 10, 10]), (0, 1));
    // Ties go to the first (numpy argmax).
    assert_eq!(pick(&[-4.0, -4.0], &[2, 2]), (0, 0));
    assert_eq!(pick(&[-9.0, -3.0], &[9, 1]), (1, 0));
}

#[test]
fn evaluate_counts_acc_and_acc_norm_from_the_scores() {
    let m = model(&configs()[1], 5);
    let mut items = load_items(McTask::Arc, &fixture("arc.jsonl")).unwrap();
    // Recompute what evaluate should report from the per-item scores and pick.
    let check = |items: &[McItem]| {
        let r = evaluate(&m, items).unwrap();
        let (mut acc, mut norm) = (0.0, 0.0);
        for it in items {
            let (p, pn) = pick(&choice_loglikelihoods(&m, it).unwrap(), &it.norm_lens());
            acc += (p == it.gold) as u8 as f64;
            norm += (pn == it.gold) as u8 as f64;
        }
        assert_eq!(r.task, McTask::Arc);
        assert_eq!(r.items, items.len());
        assert_eq!(r.acc, acc / items.len() as f64);
        assert_eq!(r.acc_norm, norm / items.len() as f64);
        r
    };
    let r = check(&items);
    // Moving each gold to the model's own pick makes acc 1; the others then count 0.
    for it in items.iter_mut() {
        it.gold = pick(&choice_loglikelihoods(&m, it).unwrap(), &it.norm_lens()).0;
    }
    assert_eq!(check(&items).acc, 1.0);
    let _ = r;
    // Mixed tasks and empty input are refused.
    let mut mixed = items.clone();
    mixed[0].task = McTask::Siqa;
    assert!(evaluate(&m, &mixed).is_err());
    assert!(evaluate_with(&m, &[], McOptions::default(), &mut |_, _| {}).is_err());
}

// ------------------------------------------------------------------------------------------
// Command line
// ------------------------------------------------------------------------------------------

fn save_checkpoint(dir: &Path, cfg: &ModelConfig, m: &MambaLm) {
    checkpoint::save(
        dir,
        CheckpointFiles {
            config: cfg,
            model: m.store.tensors(),
            optimizer: HashMap::new(),
            state: TrainerState {
                step: 0,
                tokens: 0,
                seed: 0,
                elapsed_s: 0.0,
            },
            masks: Default::default(),
        },
    )
    .unwrap();
}

fn moz_lab(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moz-lab"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_prints_the_result_line_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("run").join("checkpoint");
    std::fs::create_dir_all(ckpt.parent().unwrap()).unwrap();
    let cfg = configs()[1].clone();
    let m = model(&cfg, 9);
    save_checkpoint(&ckpt, &cfg, &m);
    let file = fixture("hellaswag.jsonl");
    let (ckpt_s, file_s) = (ckpt.to_str().unwrap(), file.to_str().unwrap());

    let out = moz_lab(&[
        "eval-mc",
        "--checkpoint",
        ckpt_s,
        "--task",
        "hellaswag",
        "--file",
        file_s,
        "--limit",
        "2",
        "--batch",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout.trim();
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(words.len(), 8, "{line}");
    assert_eq!(&words[..4], ["task", "hellaswag", "items", "2"], "{line}");
    assert_eq!((words[4], words[6]), ("acc", "acc_norm"), "{line}");
    for w in [words[5], words[7]] {
        assert!(["0.0000", "0.5000", "1.0000"].contains(&w), "{line}");
    }

    // --json on f64 (run directory given): the same numbers as the library on the same weights.
    let run_dir = tmp.path().join("run");
    let out = moz_lab(&[
        "eval-mc",
        "--checkpoint",
        run_dir.to_str().unwrap(),
        "--task",
        "hellaswag",
        "--file",
        file_s,
        "--dtype",
        "f64",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = evaluate(&m, &load_items(McTask::Hellaswag, &file).unwrap()).unwrap();
    assert_eq!(v["task"], "hellaswag");
    assert_eq!(v["items"], 3);
    assert_eq!(v["acc"].as_f64().unwrap(), want.acc);
    assert_eq!(v["acc_norm"].as_f64().unwrap(), want.acc_norm);

    // A malformed file fails with file:line: field.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"question\": \"q\"}\n").unwrap();
    let out = moz_lab(&[
        "eval-mc",
        "--checkpoint",
        ckpt_s,
        "--task",
        "arc",
        "--file",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:1: missing field \"choices\"", bad.display())),
        "{stderr}"
    );
}
