//! Experiment specs (`experiments/*.toml`): parsing, overrides, validation, and expansion into
//! one `RunSpec` per (variant, seed). Every error names the file, line, column and field.
use crate::data::{self, DataConfig, DataError};
use crate::model::canonical::AForm;
use crate::model::config::expand_pattern;
use crate::model::count::{preset, solve_experts, PRESETS};
use crate::model::mamba1::{AInit, Mamba1Config};
use crate::model::{ModelConfig, Projection, SparsityConfig};
use crate::prune::PruneConfig;
use crate::train::TrainConfig;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// A spec problem located in its file.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted field path, e.g. `variants[1].top_k` (empty for syntax errors).
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: ", self.file.display())?;
        } else {
            write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for SpecError {}

/// The `[model]` table: shared shape of every variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    pub d_model: usize,
    pub n_layer: usize,
    /// Layer letters, repeated to n_layer: M Mamba2, F MLP, E MoE MLP, A attention.
    pub pattern: String,
    pub expand: usize,
    pub headdim: usize,
    pub d_state: usize,
    pub ngroups: usize,
    pub d_conv: usize,
    pub chunk_size: usize,
    pub norm_eps: f64,
    /// 0 = 2 * d_model.
    pub mlp_hidden: usize,
    /// 0 = max(1, d_model / 64).
    pub attn_heads: usize,
    pub moe_experts: usize,
    // --- S layers (Mamba-1 / S-Mamba); variants may override a_form, a_stable, a_init ---
    /// diagonal | controllable | observable.
    pub a_form: String,
    /// Canonical forms: true = roots -exp(theta) (A_root_log), false = free coefficients (A_coef).
    pub a_stable: bool,
    /// s4d-real | geometric; empty = s4d-real for diagonal, geometric for canonical forms.
    pub a_init: String,
    /// 0 = ceil(d_model / 16).
    pub dt_rank: usize,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            d_model: 128,
            n_layer: 2,
            pattern: "M".into(),
            expand: 2,
            headdim: 32,
            d_state: 32,
            ngroups: 1,
            d_conv: 4,
            chunk_size: 32,
            norm_eps: 1e-5,
            mlp_hidden: 0,
            attn_heads: 0,
            moe_experts: 4,
            a_form: "diagonal".into(),
            a_stable: true,
            a_init: String::new(),
            dt_rank: 0,
        }
    }
}

/// One `[[variants]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    /// mamba2 | mol | mol-except-z | moz.
    #[serde(default)]
    pub preset: Option<String>,
    /// Explicit projections (z, x, B, C, dt, out); overrides the preset.
    #[serde(default)]
    pub sparsify: Option<Vec<String>>,
    #[serde(default)]
    pub experts: Option<usize>,
    /// Solve the expert count so total parameters are this multiple of the dense model's.
    #[serde(default)]
    pub match_total: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub aux_loss_coef: Option<f64>,
    #[serde(default)]
    pub z_loss_coef: Option<f64>,
    /// Overrides `model.pattern`.
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub moe_experts: Option<usize>,
    // --- pruning (issue 7, unstructured pruning) ---
    /// Unstructured pruning of this variant (`[variants.prune]`).
    #[serde(default)]
    pub prune: Option<PruneConfig>,
    // --- S layers: override the [model] values ---
    #[serde(default)]
    pub a_form: Option<String>,
    #[serde(default)]
    pub a_stable: Option<bool>,
    #[serde(default)]
    pub a_init: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Each variant runs once per seed.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// cpu | cuda:N | auto.
    #[serde(default = "default_device")]
    pub device: String,
    /// f32 | f64 | bf16.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub data: DataConfig,
    pub variants: Vec<VariantSpec>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn default_device() -> String {
    "auto".into()
}
fn default_dtype() -> String {
    "f32".into()
}

/// Everything one training run needs; written to `run.json` in its directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub experiment: String,
    pub variant: String,
    pub seed: u64,
    pub device: String,
    pub dtype: String,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub data: DataConfig,
    /// Directory relative paths in `data` resolve against.
    pub data_base: PathBuf,
    pub out_dir: PathBuf,
    // --- pruning (issue 7, unstructured pruning) ---
    /// Resolved `prune` table (end_step filled in); None: dense training.
    #[serde(default)]
    pub prune: Option<PruneConfig>,
}

impl RunSpec {
    /// Display name: `experiment/variant` (plus the seed when there are several).
    pub fn label(&self) -> String {
        let dir = self
            .out_dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        format!("{}/{}", self.experiment, dir)
    }
}

/// A parsed spec with its source text (kept to locate fields in errors).
#[derive(Debug, Clone)]
pub struct ExperimentSpec {
    pub path: PathBuf,
    pub name: String,
    pub file: SpecFile,
    source: String,
}

impl ExperimentSpec {
    pub fn load(path: &Path) -> Result<ExperimentSpec, SpecError> {
        Self::load_with(path, &[])
    }

    /// Loads with `key.path=value` overrides applied to the TOML before it is read.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<ExperimentSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text, overrides)
    }

    pub fn parse(
        path: &Path,
        text: &str,
        overrides: &[String],
    ) -> Result<ExperimentSpec, SpecError> {
        let source = apply_overrides(path, text, overrides)?;
        let file: SpecFile = toml::from_str(&source).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|s| line_col(&source, s.start))
                .unwrap_or((0, 0));
            SpecError {
                file: path.to_path_buf(),
                line,
                column,
                field: String::new(),
                message: e.message().trim().to_string(),
            }
        })?;
        let name = file.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "experiment".into())
        });
        let spec = ExperimentSpec {
            path: path.to_path_buf(),
            name,
            file,
            source,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Error at the first of `paths` present in the file (falls back to the file start).
    fn error(&self, paths: &[&str], field: &str, message: impl Into<String>) -> SpecError {
        let (line, column) = paths
            .iter()
            .find_map(|p| locate(&self.source, p))
            .unwrap_or((1, 1));
        SpecError {
            file: self.path.clone(),
            line,
            column,
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn data_base(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// Checks everything that can be checked before training starts.
    fn validate(&self) -> Result<(), SpecError> {
        let f = &self.file;
        if f.variants.is_empty() {
            return Err(self.error(
                &[],
                "variants",
                "at least one [[variants]] entry is required",
            ));
        }
        if f.seeds.is_empty() {
            return Err(self.error(&["seeds"], "seeds", "give at least one seed"));
        }
        parse_device(&f.device).map_err(|m| self.error(&["device"], "device", m))?;
        if !["f32", "f64", "bf16"].contains(&f.dtype.as_str()) {
            return Err(self.error(
                &["dtype"],
                "dtype",
                format!("unknown dtype {:?}; allowed: f32, f64, bf16", f.dtype),
            ));
        }
        f.train.check().map_err(|(field, m)| {
            self.error(&[&format!("train.{field}")], &format!("train.{field}"), m)
        })?;
        for (i, v) in f.variants.iter().enumerate() {
            if f.variants[..i].iter().any(|o| o.name == v.name) {
                let p = format!("variants[{i}].name");
                return Err(self.error(&[&p], &p, format!("duplicate variant name {:?}", v.name)));
            }
            if v.name.is_empty() || v.name.contains(['/', '\\']) || v.name.starts_with('.') {
                let p = format!("variants[{i}].name");
                return Err(self.error(
                    &[&p],
                    &p,
                    "must be a non-empty name usable as a directory",
                ));
            }
            self.resolve_model(i)?;
            // --- pruning (issue 7, unstructured pruning) ---
            if let Some(p) = &v.prune {
                p.check(f.train.steps).map_err(|(field, m)| {
                    let path = format!("variants[{i}].prune.{field}");
                    let table = format!("variants[{i}].prune");
                    self.error(&[&path, &table], &path, m)
                })?;
            }
        }
        data::build(&f.data, &self.data_base(), f.train.seq_len).map_err(|e| {
            let field = match &e {
                DataError::SeqLenTooLarge { .. } => "train.seq_len".to_string(),
                DataError::InvalidParam {
                    field: "seq_len", ..
                } => "train.seq_len".to_string(),
                DataError::InvalidParam { field, .. } => format!("data.{field}"),
                DataError::Io { .. } | DataError::EmptyCorpus(_) => "data.path".to_string(),
            };
            self.error(&[&field, "data"], &field, e.to_string())
        })?;
        Ok(())
    }

    /// The full model config of variant `i`, with the expert count solved when asked.
    pub fn resolve_model(&self, i: usize) -> Result<ModelConfig, SpecError> {
        let m = &self.file.model;
        let v = &self.file.variants[i];
        let vp = |k: &str| format!("variants[{i}].{k}");
        let var_table = format!("variants[{i}]");
        let projections = if let Some(list) = &v.sparsify {
            let mut out = Vec::new();
            for (j, s) in list.iter().enumerate() {
                let p = Projection::parse(s).ok_or_else(|| {
                    let path = format!("{}[{j}]", vp("sparsify"));
                    self.error(
                        &[&path, &vp("sparsify")],
                        &vp("sparsify"),
                        format!("unknown projection {s:?}; allowed: z, x, B, C, dt, out"),
                    )
                })?;
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            out
        } else if let Some(name) = &v.preset {
            preset(name).ok_or_else(|| {
                self.error(
                    &[&vp("preset")],
                    &vp("preset"),
                    format!("unknown preset {name:?}; allowed: {}", PRESETS.join(", ")),
                )
            })?
        } else {
            return Err(self.error(
                &[&var_table],
                &var_table,
                "give `preset` (mamba2, mol, mol-except-z, moz) or `sparsify = [...]`",
            ));
        };
        let pattern_src = v.pattern.as_deref().unwrap_or(&m.pattern);
        let pattern_field = if v.pattern.is_some() {
            vp("pattern")
        } else {
            "model.pattern".into()
        };
        let layer_pattern = expand_pattern(pattern_src, m.n_layer)
            .map_err(|e| self.error(&[&pattern_field], &pattern_field, e))?;
        if v.experts.is_some() && v.match_total.is_some() {
            return Err(self.error(
                &[&vp("match_total")],
                &vp("match_total"),
                "give either `experts` or `match_total`, not both",
            ));
        }
        let mut cfg = ModelConfig {
            d_model: m.d_model,
            n_layer: m.n_layer,
            layer_pattern,
            expand: m.expand,
            headdim: m.headdim,
            d_state: m.d_state,
            ngroups: m.ngroups,
            d_conv: m.d_conv,
            chunk_size: m.chunk_size,
            vocab_size: 256,
            norm_eps: m.norm_eps,
            mlp_hidden: if m.mlp_hidden == 0 {
                2 * m.d_model
            } else {
                m.mlp_hidden
            },
            attn_heads: if m.attn_heads == 0 {
                (m.d_model / 64).max(1)
            } else {
                m.attn_heads
            },
            moe_experts: v.moe_experts.unwrap_or(m.moe_experts),
            sparsity: SparsityConfig {
                experts: if projections.is_empty() {
                    1
                } else {
                    v.experts.unwrap_or(4)
                },
                projections,
                top_k: v.top_k.unwrap_or(1),
                aux_loss_coef: v.aux_loss_coef.unwrap_or(0.01),
                z_loss_coef: v.z_loss_coef.unwrap_or(0.0),
            },
            mamba1: self.resolve_mamba1(i)?,
        };
        if let Some(r) = v.match_total {
            if !(r.is_finite() && r > 1.0) {
                return Err(self.error(
                    &[&vp("match_total")],
                    &vp("match_total"),
                    "must be a number > 1.0",
                ));
            }
            if cfg.sparsity.projections.is_empty() {
                return Err(self.error(
                    &[&vp("match_total")],
                    &vp("match_total"),
                    "a dense variant has no experts to solve for",
                ));
            }
        }
        cfg.check().map_err(|(field, msg)| {
            let vf = vp(field);
            let mf = format!("model.{field}");
            let shown = if locate(&self.source, &vf).is_some() {
                vf.clone()
            } else {
                mf.clone()
            };
            self.error(&[&vf, &mf, &var_table], &shown, msg)
        })?;
        if let Some(r) = v.match_total {
            cfg.sparsity.experts = solve_experts(&cfg, r);
            if cfg.sparsity.top_k > cfg.sparsity.experts {
                return Err(self.error(
                    &[&vp("top_k")],
                    &vp("top_k"),
                    format!(
                        "top_k exceeds the {} experts solved for match_total",
                        cfg.sparsity.experts
                    ),
                ));
            }
        }
        Ok(cfg)
    }

    /// The S-layer settings of variant `i` (its overrides, else `[model]`).
    fn resolve_mamba1(&self, i: usize) -> Result<Mamba1Config, SpecError> {
        let m = &self.file.model;
        let v = &self.file.variants[i];
        let field = |over: bool, key: &str| {
            if over {
                format!("variants[{i}].{key}")
            } else {
                format!("model.{key}")
            }
        };
        let form_src = v.a_form.as_deref().unwrap_or(&m.a_form);
        let a_form = AForm::parse(form_src).ok_or_else(|| {
            let f = field(v.a_form.is_some(), "a_form");
            self.error(
                &[&f],
                &f,
                format!("unknown A form {form_src:?}; allowed: diagonal, controllable, observable"),
            )
        })?;
        let init_src = v.a_init.as_deref().unwrap_or(&m.a_init);
        let a_init = if init_src.is_empty() {
            AInit::default_for(a_form)
        } else {
            AInit::parse(init_src).ok_or_else(|| {
                let f = field(v.a_init.is_some(), "a_init");
                self.error(
                    &[&f],
                    &f,
                    format!("unknown A init {init_src:?}; allowed: s4d-real, geometric"),
                )
            })?
        };
        Ok(Mamba1Config {
            a_form,
            a_stable: v.a_stable.unwrap_or(m.a_stable),
            a_init,
            dt_rank: m.dt_rank,
        })
    }

    /// One run per (variant, seed), under `runs_root/<experiment>/<variant>[-seed<S>]`.
    pub fn runs(&self, runs_root: &Path) -> Result<Vec<RunSpec>, SpecError> {
        let f = &self.file;
        let mut out = Vec::new();
        for (i, v) in f.variants.iter().enumerate() {
            let model = self.resolve_model(i)?;
            for &seed in &f.seeds {
                let dir = if f.seeds.len() == 1 {
                    v.name.clone()
                } else {
                    format!("{}-seed{seed}", v.name)
                };
                out.push(RunSpec {
                    experiment: self.name.clone(),
                    variant: v.name.clone(),
                    seed,
                    device: f.device.clone(),
                    dtype: f.dtype.clone(),
                    model: model.clone(),
                    train: f.train.clone(),
                    data: f.data.clone(),
                    data_base: self.data_base(),
                    out_dir: runs_root.join(&self.name).join(dir),
                    prune: v.prune.as_ref().map(|p| p.resolved(f.train.steps)),
                });
            }
        }
        Ok(out)
    }
}

/// Accepted device strings: cpu, auto, cuda, cuda:N.
pub fn parse_device(s: &str) -> Result<Option<usize>, String> {
    match s {
        "cpu" | "auto" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Some)
            .ok_or_else(|| format!("unknown device {s:?}; allowed: cpu, auto, cuda, cuda:N")),
    }
}

/// 1-based (line, column) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

/// Position of a dotted path like `variants[1].top_k` or `train.lr` in the TOML source.
fn locate(source: &str, path: &str) -> Option<(usize, usize)> {
    enum Node<'a> {
        Item(&'a toml_edit::Item),
        Table(&'a toml_edit::Table),
    }
    let doc = toml_edit::ImDocument::parse(source.to_string()).ok()?;
    let mut node = Node::Table(doc.as_table());
    for seg in split_path(path) {
        node = match (seg, node) {
            (Seg::Key(k), Node::Table(t)) => Node::Item(t.get(k)?),
            (Seg::Key(k), Node::Item(i)) => Node::Item(i.get(k)?),
            (Seg::Index(i), Node::Item(toml_edit::Item::ArrayOfTables(a))) => {
                Node::Table(a.get(i)?)
            }
            (Seg::Index(i), Node::Item(toml_edit::Item::Value(toml_edit::Value::Array(a)))) => {
                return a.get(i)?.span().map(|s| line_col(source, s.start));
            }
            _ => return None,
        };
    }
    let span = match node {
        Node::Table(t) => t.span(),
        Node::Item(toml_edit::Item::Table(t)) => t.span(),
        Node::Item(toml_edit::Item::Value(v)) => v.span(),
        Node::Item(toml_edit::Item::ArrayOfTables(a)) => a.span(),
        Node::Item(toml_edit::Item::None) => None,
    }?;
    Some(line_col(source, span.start))
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Seg::Key(key));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                out.push(Seg::Index(i));
            }
        }
    }
    out
}

/// Applies `a.b=value` overrides (value parsed as TOML, else taken as a string).
fn apply_overrides(path: &Path, text: &str, overrides: &[String]) -> Result<String, SpecError> {
    if overrides.is_empty() {
        return Ok(text.to_string());
    }
    let err = |m: String| SpecError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        field: String::new(),
        message: m,
    };
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| err(e.to_string()))?;
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| err(format!("--set {o:?}: expected key.path=value")))?;
        let value: toml_edit::Value = value
            .trim()
            .parse()
            .unwrap_or_else(|_| toml_edit::Value::from(value.trim()));
        let keys: Vec<&str> = key.trim().split('.').collect();
        let (last, parents) = keys.split_last().unwrap();
        let mut table = doc.as_table_mut();
        for k in parents {
            let entry = table
                .entry(k)
                .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
            table = entry
                .as_table_mut()
                .ok_or_else(|| err(format!("--set {o:?}: {k} is not a table")))?;
        }
        table[*last] = toml_edit::Item::Value(value);
    }
    Ok(doc.to_string())
}
