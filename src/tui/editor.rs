//! The variant editor: an edited copy of one `[[variants]]` entry (plus the spec's seeds), its
//! live parameter counts, and saving it back into the TOML file with toml_edit so the user's
//! comments and formatting survive.
use crate::lab::spec::{ExperimentSpec, RunSpec, VariantSpec};
use crate::model::canonical::AForm;
use crate::model::count::{preset, ParamCount};
use crate::model::Projection;
use crate::prune::{Method, PruneConfig, PruneSchedule, Scope};
use std::path::Path;

/// One editable row of the editor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Sparsify(Projection),
    Experts,
    MatchTotal,
    TopK,
    Pattern,
    /// `[variants.prune]`: off or a method.
    PruneMethod,
    PruneTarget,
    PruneSchedule,
    PruneScope,
    /// State-matrix form of the S layers (variant override of `model.a_form`).
    AForm,
    Seeds,
}

pub const FIELDS: [Field; 16] = [
    Field::Sparsify(Projection::Z),
    Field::Sparsify(Projection::X),
    Field::Sparsify(Projection::B),
    Field::Sparsify(Projection::C),
    Field::Sparsify(Projection::Dt),
    Field::Sparsify(Projection::Out),
    Field::Experts,
    Field::MatchTotal,
    Field::TopK,
    Field::Pattern,
    Field::PruneMethod,
    Field::PruneTarget,
    Field::PruneSchedule,
    Field::PruneScope,
    Field::AForm,
    Field::Seeds,
];

impl Field {
    pub fn label(self) -> String {
        match self {
            Field::Sparsify(p) => format!("{} proj", p.name()),
            Field::Experts => "experts".into(),
            Field::MatchTotal => "match_total".into(),
            Field::TopK => "top_k".into(),
            Field::Pattern => "pattern".into(),
            Field::PruneMethod => "prune".into(),
            Field::PruneTarget => "  sparsity".into(),
            Field::PruneSchedule => "  schedule".into(),
            Field::PruneScope => "  threshold".into(),
            Field::AForm => "A form (S)".into(),
            Field::Seeds => "seeds (spec)".into(),
        }
    }
}

/// The entry after (or before) `cur` in `all`, wrapping.
fn cycle<T: Copy + PartialEq>(all: &[T], cur: T, up: bool) -> T {
    let i = all.iter().position(|&x| x == cur).unwrap_or(0);
    let n = all.len();
    all[if up { (i + 1) % n } else { (i + n - 1) % n }]
}

/// The edited state of one variant.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub variant: VariantSpec,
    pub seeds: Vec<u64>,
}

impl Draft {
    pub fn of(spec: &ExperimentSpec, variant: usize) -> Draft {
        Draft {
            variant: spec.file.variants[variant].clone(),
            seeds: spec.file.seeds.clone(),
        }
    }

    /// The sparsified projections: the explicit list, else the preset's.
    pub fn projections(&self) -> Vec<Projection> {
        let v = &self.variant;
        match &v.sparsify {
            Some(list) => list.iter().filter_map(|s| Projection::parse(s)).collect(),
            None => v.preset.as_deref().and_then(preset).unwrap_or_default(),
        }
    }

    pub fn is_sparse(&self, p: Projection) -> bool {
        self.projections().contains(&p)
    }

    /// Toggles a projection. The explicit list is dropped again when it equals the preset.
    pub fn toggle(&mut self, p: Projection) {
        let mut set = self.projections();
        if let Some(i) = set.iter().position(|&x| x == p) {
            set.remove(i);
        } else {
            set.push(p);
        }
        let ordered: Vec<Projection> = Projection::ALL
            .into_iter()
            .filter(|x| set.contains(x))
            .collect();
        let from_preset = self
            .variant
            .preset
            .as_deref()
            .and_then(preset)
            .map(|mut v| {
                v.sort();
                v
            });
        let mut sorted = ordered.clone();
        sorted.sort();
        self.variant.sparsify = if from_preset == Some(sorted) {
            None
        } else {
            Some(ordered.iter().map(|p| p.name().to_string()).collect())
        };
    }

    /// `+` / `-` on a numeric field (experts and match_total exclude each other).
    pub fn adjust(&mut self, field: Field, up: bool) {
        let v = &mut self.variant;
        match field {
            Field::Experts => {
                let e = v.experts.unwrap_or(4);
                v.experts = Some(if up {
                    e + 1
                } else {
                    e.saturating_sub(1).max(1)
                });
                v.match_total = None;
            }
            Field::MatchTotal => {
                let r = v.match_total.unwrap_or(1.75);
                let r = if up { r + 0.25 } else { (r - 0.25).max(1.25) };
                v.match_total = Some(r);
                v.experts = None;
            }
            Field::TopK => {
                let k = v.top_k.unwrap_or(1);
                v.top_k = Some(if up {
                    k + 1
                } else {
                    k.saturating_sub(1).max(1)
                });
            }
            Field::Sparsify(p) => self.toggle(p),
            Field::PruneMethod => {
                // off -> gradient -> magnitude -> wanda -> off
                let all: Vec<Option<Method>> = std::iter::once(None)
                    .chain(Method::ALL.into_iter().map(Some))
                    .collect();
                let next = cycle(&all, v.prune.as_ref().map(|p| p.method), up);
                self.set_prune_method(next);
            }
            Field::PruneTarget => {
                let p = v.prune.get_or_insert_with(PruneConfig::default);
                // Tenths, within [0.1, 0.9]; snapping keeps repeated steps exact.
                let tenths = (p.target * 10.0).round() + if up { 1.0 } else { -1.0 };
                p.target = tenths.clamp(1.0, 9.0) / 10.0;
                p.initial = p.initial.min(p.target);
            }
            Field::PruneSchedule => {
                if let Some(p) = v.prune.as_mut() {
                    p.schedule = cycle(&PruneSchedule::ALL, p.schedule, up);
                }
            }
            Field::PruneScope => {
                if let Some(p) = v.prune.as_mut() {
                    p.scope = cycle(&Scope::ALL, p.scope, up);
                }
            }
            Field::AForm => {
                let cur = v
                    .a_form
                    .as_deref()
                    .and_then(AForm::parse)
                    .unwrap_or_default();
                v.a_form = Some(cycle(&AForm::ALL, cur, up).name().to_string());
            }
            Field::Pattern | Field::Seeds => {}
        }
    }

    /// Turns pruning off (None) or sets its method, keeping the other prune settings.
    fn set_prune_method(&mut self, method: Option<Method>) {
        let v = &mut self.variant;
        match method {
            None => v.prune = None,
            Some(m) => v.prune.get_or_insert_with(PruneConfig::default).method = m,
        }
    }

    /// Resets an optional field to its default (unset).
    pub fn clear(&mut self, field: Field) {
        let v = &mut self.variant;
        match field {
            Field::Experts => v.experts = None,
            Field::MatchTotal => v.match_total = None,
            Field::TopK => v.top_k = None,
            Field::Pattern => v.pattern = None,
            Field::PruneMethod => v.prune = None,
            Field::PruneTarget => {
                if let Some(p) = v.prune.as_mut() {
                    p.target = PruneConfig::default().target.max(p.initial);
                }
            }
            Field::PruneSchedule => {
                if let Some(p) = v.prune.as_mut() {
                    p.schedule = PruneConfig::default().schedule;
                }
            }
            Field::PruneScope => {
                if let Some(p) = v.prune.as_mut() {
                    p.scope = PruneConfig::default().scope;
                }
            }
            Field::AForm => v.a_form = None,
            Field::Seeds | Field::Sparsify(_) => {}
        }
    }

    /// The text a field is edited from.
    pub fn text_of(&self, field: Field) -> String {
        let v = &self.variant;
        let opt = |x: Option<String>| x.unwrap_or_default();
        match field {
            Field::Sparsify(p) => if self.is_sparse(p) { "x" } else { "" }.into(),
            Field::Experts => opt(v.experts.map(|e| e.to_string())),
            Field::MatchTotal => opt(v.match_total.map(|r| r.to_string())),
            Field::TopK => opt(v.top_k.map(|k| k.to_string())),
            Field::Pattern => opt(v.pattern.clone()),
            Field::PruneMethod => opt(v.prune.as_ref().map(|p| p.method.name().to_string())),
            Field::PruneTarget => opt(v.prune.as_ref().map(|p| p.target.to_string())),
            Field::PruneSchedule => opt(v.prune.as_ref().map(|p| p.schedule.name().to_string())),
            Field::PruneScope => opt(v.prune.as_ref().map(|p| p.scope.name().to_string())),
            Field::AForm => opt(v.a_form.clone()),
            Field::Seeds => self
                .seeds
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// Sets a field from typed text; an empty text clears an optional field.
    pub fn set_text(&mut self, field: Field, text: &str) -> Result<(), String> {
        let text = text.trim();
        if text.is_empty() && field != Field::Seeds {
            self.clear(field);
            return Ok(());
        }
        let v = &mut self.variant;
        let count = |what: &str| -> Result<usize, String> {
            match text.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!("{what}: {text:?} is not a whole number >= 1")),
            }
        };
        match field {
            Field::Experts => {
                v.experts = Some(count("experts")?);
                v.match_total = None;
            }
            Field::TopK => v.top_k = Some(count("top_k")?),
            Field::MatchTotal => match text.parse::<f64>() {
                Ok(r) if r.is_finite() && r > 1.0 => {
                    v.match_total = Some(r);
                    v.experts = None;
                }
                _ => return Err(format!("match_total: {text:?} is not a number > 1.0")),
            },
            Field::Pattern => {
                if let Some(c) = text.chars().find(|c| !"MFEAS".contains(*c)) {
                    return Err(format!(
                        "pattern: {c:?} is not a layer letter (M, F, E, A, S)"
                    ));
                }
                v.pattern = Some(text.to_string());
            }
            Field::PruneMethod => {
                let m = match text {
                    "off" | "none" => None,
                    _ => Some(
                        Method::ALL
                            .into_iter()
                            .find(|m| m.name() == text)
                            .ok_or_else(|| {
                                format!("prune: {text:?} is not off, gradient, magnitude or wanda")
                            })?,
                    ),
                };
                self.set_prune_method(m);
            }
            Field::PruneTarget => match text.parse::<f64>() {
                Ok(t) if (0.0..1.0).contains(&t) => {
                    let p = v.prune.get_or_insert_with(PruneConfig::default);
                    p.target = t;
                    p.initial = p.initial.min(t);
                }
                _ => return Err(format!("prune target: {text:?} is not a number in [0, 1)")),
            },
            Field::PruneSchedule | Field::PruneScope => {
                let Some(p) = v.prune.as_mut() else {
                    return Err("pruning is off: set prune to a method first".into());
                };
                if field == Field::PruneSchedule {
                    p.schedule = PruneSchedule::ALL
                        .into_iter()
                        .find(|x| x.name() == text)
                        .ok_or_else(|| format!("schedule: {text:?} is not cubic or one-shot"))?;
                } else {
                    p.scope = Scope::ALL
                        .into_iter()
                        .find(|x| x.name() == text)
                        .ok_or_else(|| format!("threshold: {text:?} is not global or per-layer"))?;
                }
            }
            Field::AForm => {
                let f = AForm::parse(text).ok_or_else(|| {
                    format!("A form: {text:?} is not diagonal, controllable or observable")
                })?;
                v.a_form = Some(f.name().to_string());
            }
            Field::Seeds => {
                let seeds: Result<Vec<u64>, _> = text
                    .split([',', ' '])
                    .filter(|s| !s.is_empty())
                    .map(str::parse::<u64>)
                    .collect();
                match seeds {
                    Ok(s) if !s.is_empty() => self.seeds = s,
                    _ => return Err(format!("seeds: {text:?} is not a list like 0, 1, 2")),
                }
            }
            Field::Sparsify(p) => self.toggle(p),
        }
        Ok(())
    }

    /// The spec with this draft in place of variant `i`. A dense draft drops experts and
    /// match_total (they mean nothing without experts and would be rejected).
    pub fn apply(&self, spec: &ExperimentSpec, i: usize) -> ExperimentSpec {
        let mut s = spec.clone();
        let mut v = self.variant.clone();
        if self.projections().is_empty() {
            v.experts = None;
            v.match_total = None;
        }
        s.file.variants[i] = v;
        s.file.seeds = self.seeds.clone();
        s
    }

    /// The runs this draft launches (one per seed).
    pub fn runs(
        &self,
        spec: &ExperimentSpec,
        i: usize,
        runs_root: &Path,
    ) -> Result<Vec<RunSpec>, String> {
        let s = self.apply(spec, i);
        let name = &s.file.variants[i].name;
        let runs = s.runs(runs_root).map_err(|e| spec_error_text(&e))?;
        Ok(runs.into_iter().filter(|r| &r.variant == name).collect())
    }
}

fn spec_error_text(e: &crate::lab::spec::SpecError) -> String {
    if e.field.is_empty() {
        e.message.clone()
    } else {
        format!("{}: {}", e.field, e.message)
    }
}

/// Live parameter counts of a draft.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    pub total: usize,
    pub active: usize,
    /// The same model with no sparsified projection.
    pub dense_total: usize,
    pub experts: usize,
    pub top_k: usize,
    pub projections: Vec<Projection>,
    pub layer_pattern: String,
    /// (component, total, active) as `moz-lab params` lists them.
    pub components: Vec<(String, usize, usize)>,
}

pub fn preview(spec: &ExperimentSpec, i: usize, draft: &Draft) -> Result<Preview, String> {
    let s = draft.apply(spec, i);
    let cfg = s.resolve_model(i).map_err(|e| spec_error_text(&e))?;
    let mut dense = cfg.clone();
    dense.sparsity.projections.clear();
    let count = ParamCount::of(&cfg);
    Ok(Preview {
        total: count.total(),
        active: count.active(),
        dense_total: ParamCount::of(&dense).total(),
        experts: cfg.sparsity.experts,
        top_k: cfg.sparsity.top_k,
        projections: cfg.sparsity.projections.clone(),
        layer_pattern: cfg.layer_pattern.clone(),
        components: count
            .components
            .iter()
            .map(|(name, (total, active))| (name.clone(), *total, active.round() as usize))
            .collect(),
    })
}

/// The file text with variant `i` (and the spec's seeds) replaced by the draft. Only fields
/// that changed are written, each keeping its trailing comment; everything else is untouched.
pub fn save_variant(
    source: &str,
    spec: &ExperimentSpec,
    i: usize,
    draft: &Draft,
) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = source.parse().map_err(|e| format!("{e}"))?;
    let old = &spec.file.variants[i];
    let new = &draft.apply(spec, i).file.variants[i];
    if spec.file.seeds != draft.seeds {
        let arr: toml_edit::Array = draft.seeds.iter().map(|&s| s as i64).collect();
        set_value(doc.as_table_mut(), "seeds", Some(arr.into()));
    }
    let table = doc
        .get_mut("variants")
        .and_then(|v| v.as_array_of_tables_mut())
        .and_then(|a| a.get_mut(i))
        .ok_or_else(|| format!("the file has no [[variants]] entry number {}", i + 1))?;
    if old.sparsify != new.sparsify {
        let v = new.sparsify.as_ref().map(|list| {
            let arr: toml_edit::Array = list.iter().map(String::as_str).collect();
            toml_edit::Value::from(arr)
        });
        set_value(table, "sparsify", v);
    }
    if old.experts != new.experts {
        set_value(table, "experts", new.experts.map(|e| (e as i64).into()));
    }
    if old.match_total != new.match_total {
        set_value(table, "match_total", new.match_total.map(Into::into));
    }
    if old.top_k != new.top_k {
        set_value(table, "top_k", new.top_k.map(|k| (k as i64).into()));
    }
    if old.pattern != new.pattern {
        set_value(table, "pattern", new.pattern.as_deref().map(Into::into));
    }
    if old.a_form != new.a_form {
        set_value(table, "a_form", new.a_form.as_deref().map(Into::into));
    }
    if old.prune != new.prune {
        save_prune(table, old.prune.as_ref(), new.prune.as_ref());
    }
    Ok(doc.to_string())
}

/// Writes the `prune` table of a variant: removed when pruning is turned off; otherwise only
/// the keys the editor changed (a new table gets method and target, the rest keeps the
/// defaults). Works for `[variants.prune]` and inline `prune = { ... }` alike.
fn save_prune(table: &mut toml_edit::Table, old: Option<&PruneConfig>, new: Option<&PruneConfig>) {
    let Some(new) = new else {
        table.remove("prune");
        return;
    };
    let fresh = PruneConfig::default();
    let old = old.unwrap_or(&fresh);
    if !table.contains_key("prune") {
        table.insert("prune", toml_edit::Item::Table(toml_edit::Table::new()));
    }
    let Some(t) = table.get_mut("prune").and_then(|i| i.as_table_like_mut()) else {
        return;
    };
    let created = t.is_empty();
    let strs = [
        ("method", old.method.name(), new.method.name()),
        ("schedule", old.schedule.name(), new.schedule.name()),
        ("scope", old.scope.name(), new.scope.name()),
    ];
    for (key, a, b) in strs {
        if a != b || (created && key == "method") {
            set_value(t, key, Some(b.into()));
        }
    }
    if old.target != new.target || created {
        set_value(t, "target", Some(new.target.into()));
    }
    if old.initial != new.initial {
        set_value(t, "initial", Some(new.initial.into()));
    }
}

/// Sets (or removes, for `None`) a key, keeping the old value's surrounding whitespace and
/// trailing comment.
fn set_value(table: &mut dyn toml_edit::TableLike, key: &str, value: Option<toml_edit::Value>) {
    let Some(mut value) = value else {
        table.remove(key);
        return;
    };
    match table.get_mut(key) {
        Some(item) => {
            if let Some(old) = item.as_value() {
                *value.decor_mut() = old.decor().clone();
            }
            *item = toml_edit::Item::Value(value);
        }
        None => {
            table.insert(key, toml_edit::Item::Value(value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"# my experiment
seeds = [0]   # one seed
[model]
d_model = 16
n_layer = 1
headdim = 8
d_state = 8
[train]
steps = 3
batch_size = 2
seq_len = 16
[[variants]]
name = "dense"
preset = "mamba2"
[[variants]]
name = "moz"
preset = "moz"
experts = 4     # four experts
top_k = 1
"#;

    fn spec() -> ExperimentSpec {
        ExperimentSpec::parse(Path::new("experiments/t.toml"), SPEC, &[]).unwrap()
    }

    #[test]
    fn toggling_back_to_the_preset_drops_the_explicit_list() {
        let s = spec();
        let mut d = Draft::of(&s, 1);
        d.toggle(Projection::Out);
        assert_eq!(d.variant.sparsify, Some(vec!["z".into(), "out".into()]));
        d.toggle(Projection::Out);
        assert_eq!(d.variant.sparsify, None);
    }

    #[test]
    fn save_keeps_comments_and_writes_only_changes() {
        let s = spec();
        let mut d = Draft::of(&s, 1);
        d.adjust(Field::Experts, true);
        d.set_text(Field::Seeds, "0, 1").unwrap();
        d.toggle(Projection::X);
        let out = save_variant(SPEC, &s, 1, &d).unwrap();
        assert!(out.contains("experts = 5     # four experts"), "{out}");
        assert!(out.contains("seeds = [0, 1]   # one seed"), "{out}");
        assert!(out.contains("sparsify = [\"z\", \"x\"]"), "{out}");
        assert!(out.starts_with("# my experiment\n"));
        let again = ExperimentSpec::parse(Path::new("t.toml"), &out, &[]).unwrap();
        assert_eq!(again.file.variants[1].experts, Some(5));
    }

    #[test]
    fn prune_and_a_form_fields_round_trip_through_the_file() {
        let s = spec();
        let mut d = Draft::of(&s, 0);
        assert_eq!(d.variant.prune, None);
        d.adjust(Field::PruneMethod, true);
        assert_eq!(d.variant.prune.as_ref().unwrap().method, Method::Gradient);
        d.adjust(Field::PruneMethod, true);
        d.adjust(Field::PruneTarget, true);
        d.adjust(Field::PruneTarget, true);
        d.adjust(Field::PruneSchedule, true);
        d.set_text(Field::AForm, "observable").unwrap();
        let pr = d.variant.prune.clone().unwrap();
        assert_eq!(pr.method, Method::Magnitude);
        assert_eq!(pr.target, 0.7, "0.5 plus two tenths");
        assert_eq!(pr.schedule, PruneSchedule::OneShot);
        let out = save_variant(SPEC, &s, 0, &d).unwrap();
        assert!(out.contains("[variants.prune]"), "{out}");
        assert!(out.contains("a_form = \"observable\""), "{out}");
        let again = ExperimentSpec::parse(Path::new("t.toml"), &out, &[]).unwrap();
        assert_eq!(again.file.variants[0].prune.as_ref(), Some(&pr));
        assert!(
            again.runs(Path::new("runs")).is_ok(),
            "the saved spec validates"
        );
        // Off again: the table goes; the other variant's text is untouched.
        let mut d2 = Draft::of(&again, 0);
        d2.adjust(Field::PruneMethod, true);
        assert_eq!(d2.variant.prune.as_ref().unwrap().method, Method::Wanda);
        d2.adjust(Field::PruneMethod, true);
        assert_eq!(d2.variant.prune, None);
        let off = save_variant(&out, &again, 0, &d2).unwrap();
        assert!(!off.contains("prune"), "{off}");
        assert!(off.contains("experts = 4     # four experts"), "{off}");
    }

    #[test]
    fn prune_text_input_is_checked() {
        let s = spec();
        let mut d = Draft::of(&s, 0);
        assert!(
            d.set_text(Field::PruneScope, "global").is_err(),
            "pruning off"
        );
        assert!(d.set_text(Field::PruneMethod, "random").is_err());
        d.set_text(Field::PruneMethod, "wanda").unwrap();
        assert!(d.set_text(Field::PruneTarget, "1.0").is_err());
        d.set_text(Field::PruneTarget, "0.35").unwrap();
        d.set_text(Field::PruneScope, "per-layer").unwrap();
        assert_eq!(d.variant.prune.as_ref().unwrap().scope, Scope::PerLayer);
        assert!(d.set_text(Field::AForm, "free").is_err());
        assert!(
            d.set_text(Field::Pattern, "MSMA").is_ok(),
            "S is a layer letter"
        );
        d.set_text(Field::PruneMethod, "off").unwrap();
        assert_eq!(d.variant.prune, None);
    }

    #[test]
    fn dense_preview_ignores_expert_settings() {
        let s = spec();
        let mut d = Draft::of(&s, 1);
        d.toggle(Projection::Z);
        let p = preview(&s, 1, &d).unwrap();
        assert_eq!(p.total, p.dense_total);
        assert_eq!(p.total, p.active);
    }
}
