//! The edit panel (left, under Generate): edit mode on or off, the edited prompt and its alignment,
//! the attention windows, local blend, running and resetting the edit, and what the canvas compares.
//! It edits a copy of the edit's settings and asks for the change with
//! [`UiCommand::SetEditSession`].

use egui::Color32;

use crate::analysis::alignment::{EditKind, WordChange, WordPair};
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::edit::spec::{
    is_blend_word, pair_blend_selectors, preview_alignment, prune_spec, set_blend_words,
    whitespace_layout,
};
use crate::ui::edit::{changes_nothing, EditMode, NOTHING_TO_EDIT};
use crate::ui::run_view::RunView;
use crate::ui::session::{CompareMode, EditBranchView};
use crate::worker::{EditSpec, StepWindow};

/// The edit panel's own state.
#[derive(Default)]
pub(crate) struct EditPanel {
    /// Id of the edit prompt field (no automatic run while it has the focus).
    prompt_field: Option<egui::Id>,
}

impl EditPanel {
    /// True while the edited prompt is being typed (the edit waits before it re-runs).
    pub(crate) fn is_typing(&self, egui_ctx: &egui::Context) -> bool {
        self.prompt_field
            .is_some_and(|id| egui_ctx.memory(|memory| memory.has_focus(id)))
    }
}

/// Edit mode's controls.
pub(crate) fn edit_panel_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    panel: &mut EditPanel,
    commands: &mut UiCommands,
) {
    ui.separator();
    let edit = &ctx.state.modes.edit;
    let mut enabled = edit.enabled();
    if ui
        .checkbox(&mut enabled, "Edit mode")
        .on_hover_text("Prompt-to-Prompt: edit the image by editing its prompt")
        .changed()
    {
        commands.push(UiCommand::SetEditMode(enabled));
    }
    if !edit.enabled() {
        return;
    }
    let source_prompt = ctx.state.source_params().prompt.clone();
    let mut session = edit.session().clone();

    let label = ui.label("Edit prompt");
    let response = ui
        .add(
            egui::TextEdit::singleline(&mut session.spec.edit_prompt)
                .desired_width(f32::INFINITY)
                .hint_text("a red square and a blue square"),
        )
        .labelled_by(label.id);
    panel.prompt_field = Some(response.id);
    if response.changed() {
        prune_spec(&mut session.spec, &source_prompt);
    }
    if changes_nothing(&session.spec, &source_prompt) {
        if !session.spec.edit_prompt.trim().is_empty() {
            ui.colored_label(ui.visuals().warn_fg_color, NOTHING_TO_EDIT);
        }
    } else if response.has_focus() && edit.is_unsent(&session.spec) {
        // The edit waits while the prompt is typed: say how to run it.
        let hint = if ctx.state.run_finished() {
            "Press Enter to run the edit"
        } else {
            "Generate the source image to run the edit"
        };
        ui.colored_label(ui.visuals().warn_fg_color, hint);
    }

    alignment_ui(ui, edit, &session.spec, &source_prompt);
    let source_grids = ctx
        .state
        .run
        .as_ref()
        .map(RunView::probe_grids)
        .unwrap_or_default();
    windows_ui(ui, &mut session.spec, source_grids);
    blend_ui(ui, &mut session.spec, &source_prompt);

    ui.horizontal(|ui| {
        let can_run = !session.spec.edit_prompt.trim().is_empty();
        if ui
            .add_enabled(can_run, egui::Button::new("Run edit"))
            .on_hover_text("Re-runs only the edited branch (the source is reused)")
            .clicked()
        {
            commands.push(UiCommand::RunEdit);
        }
        if ui
            .button("Reset edit")
            .on_hover_text("Back to the default windows and the model's recommended self layers")
            .clicked()
        {
            commands.push(UiCommand::ResetEdit);
        }
    });

    ui.label("Heat maps of");
    ui.horizontal(|ui| {
        ui.radio_value(&mut session.viewing, EditBranchView::Source, "Source");
        ui.radio_value(&mut session.viewing, EditBranchView::Edited, "Edited");
    });
    ui.horizontal(|ui| {
        ui.radio_value(
            &mut session.compare,
            CompareMode::SideBySide,
            "Side by side",
        );
        ui.radio_value(&mut session.compare, CompareMode::Swipe, "Swipe");
    });
    ui.checkbox(&mut session.show_blend_mask, "Show blend mask");
    if let Some(info) = edit.info() {
        let text = if info.source_reused {
            format!(
                "Source reused (recorded {} time(s))",
                info.source_recordings
            )
        } else {
            format!("Source recorded ({} time(s))", info.source_recordings)
        };
        ui.weak(text);
    }
    if session != *edit.session() {
        // The copy was taken before this frame's other changes: it goes first, so that those
        // (run, reset, edit mode off, a word weight) act on it.
        commands.push_first(UiCommand::SetEditSession(Box::new(session)));
    }
}

/// The word-to-word alignment: the engine's when it belongs to these prompts, else a preview.
fn alignment_ui(ui: &mut egui::Ui, edit: &EditMode, spec: &EditSpec, source_prompt: &str) {
    let from_engine = edit.info_with_source().filter(|(source, info)| {
        *source == source_prompt
            && edit
                .run()
                .is_some_and(|run| run.params.prompt == spec.edit_prompt)
            && spec.kind.is_none_or(|kind| kind == info.kind)
    });
    let alignment = match from_engine {
        Some((_, info)) => Ok((info.kind, info.words.clone())),
        None => preview_alignment(source_prompt, &spec.edit_prompt, spec.kind),
    };
    match alignment {
        Ok((kind, words)) => {
            let unchanged = words.iter().all(|pair| pair.change == WordChange::Same);
            let kind_text = match kind {
                _ if unchanged => "no word changed",
                EditKind::Replace => "Word swap",
                EditKind::Refine => "Refine (words added or removed)",
            };
            ui.label(format!("Alignment: {kind_text}"));
            ui.horizontal_wrapped(|ui| {
                ui.spacing_mut().item_spacing.x = 6.0;
                for pair in &words {
                    alignment_chip(ui, pair);
                }
            });
        }
        Err(error) => {
            ui.colored_label(ui.visuals().error_fg_color, error);
        }
    }
}

/// Cross- and self-attention windows.
fn windows_ui(ui: &mut egui::Ui, spec: &mut EditSpec, source_grids: Vec<(usize, usize)>) {
    ui.label("Attention windows (fraction of the steps)")
        .on_hover_text(
            "Cross: where the edited prompt takes the source's word attention; \
             self: where it takes the source's self-attention (the layout)",
        );
    window_sliders(ui, &mut spec.cross_window.default, "Cross");
    window_sliders(ui, &mut spec.self_replace.window, "Self");
    // Which self-attention layers take the source's attention: the reference replaces those of
    // at most 16x16 queries (SD's two coarsest at 512 px); a model folder may recommend its own
    // (the bundled model: 32x32 and coarser, its two grids, for the first 20% of the steps).
    // Finer layers and longer windows hold the source closer, its shapes too.
    let mut sides: Vec<usize> = source_grids
        .into_iter()
        .map(|(h, w)| h.max(w))
        // The source's self-attention is recorded for every replaced layer and step: 64x64
        // layers (SD at 512 px) would take gigabytes.
        .filter(|&side| side <= 32)
        .collect();
    sides.push(16);
    sides.sort_unstable();
    sides.dedup();
    let current = self_replace_side(spec.self_replace.max_queries);
    if !sides.contains(&current) {
        sides.push(current);
        sides.sort_unstable();
    }
    let mut chosen = current;
    egui::ComboBox::from_label("Self layers up to")
        .selected_text(format!("{current}x{current} and coarser"))
        .show_ui(ui, |ui| {
            for &side in &sides {
                ui.selectable_value(&mut chosen, side, format!("{side}x{side} and coarser"));
            }
        })
        .response
        .on_hover_text(
            "Self-attention layers with at most this many query cells take the source's \
             self-attention inside the self window (the reference: 16x16; the default is \
             the model's recommendation). Finer layers keep more of the source, its shapes too",
        );
    if chosen != current {
        spec.self_replace.max_queries = chosen * chosen;
    }
}

/// Local-blend words (and the Segments view's mask).
fn blend_ui(ui: &mut egui::Ui, spec: &mut EditSpec, source_prompt: &str) {
    ui.label("Local blend: only these words' regions change");
    let pairs = preview_alignment(source_prompt, &spec.edit_prompt, spec.kind)
        .map(|(_, words)| words)
        .unwrap_or_default();
    let (_, source_words) = whitespace_layout(source_prompt);
    let (_, edit_words) = whitespace_layout(&spec.edit_prompt);
    ui.horizontal_wrapped(|ui| {
        for pair in &pairs {
            let selectors = pair_blend_selectors(pair, &source_words, &edit_words);
            let words: Vec<&str> = selectors.iter().map(String::as_str).collect();
            if words.is_empty() {
                continue;
            }
            let mut on = words.iter().any(|word| is_blend_word(spec, word));
            let text = match pair.change {
                WordChange::Swapped => format!("{} / {}", pair.source_text, pair.edit_text),
                _ if pair.edit_text.is_empty() => pair.source_text.clone(),
                _ => pair.edit_text.clone(),
            };
            let label = format!("Blend {text}");
            let response = ui.checkbox(&mut on, text.as_str());
            response
                .widget_info(|| egui::WidgetInfo::selected(egui::Role::CheckBox, true, on, &label));
            if response.changed() {
                set_blend_words(spec, &words, on);
            }
        }
    });
    let has_mask = spec
        .local_blend
        .as_ref()
        .is_some_and(|blend| blend.mask.is_some());
    if has_mask {
        ui.horizontal(|ui| {
            ui.weak("Using a mask from Segments");
            if ui.button("Clear mask").clicked() {
                if let Some(blend) = &mut spec.local_blend {
                    blend.mask = None;
                }
                set_blend_words(spec, &[], false);
            }
        });
    }
    if let Some(blend) = &mut spec.local_blend {
        let mut threshold = blend.threshold;
        if ui
            .add(egui::Slider::new(&mut threshold, 0.05..=0.95).text("Blend threshold"))
            .changed()
        {
            blend.threshold = threshold;
        }
    }
}

/// Two sliders for a step window, labelled "<name> start" and "<name> end".
fn window_sliders(ui: &mut egui::Ui, window: &mut StepWindow, name: &str) {
    let mut start = window.start;
    let mut end = window.end;
    let start_changed = ui
        .add(
            egui::Slider::new(&mut start, 0.0..=1.0)
                .fixed_decimals(2)
                .text(format!("{name} start")),
        )
        .changed();
    let end_changed = ui
        .add(
            egui::Slider::new(&mut end, 0.0..=1.0)
                .fixed_decimals(2)
                .text(format!("{name} end")),
        )
        .changed();
    if start_changed {
        window.start = start.min(end);
    }
    if end_changed {
        window.end = end.max(window.start);
    }
}

/// The side of the largest square grid with at most `max_queries` cells.
fn self_replace_side(max_queries: usize) -> usize {
    max_queries.isqrt()
}

/// One alignment entry: "circle -> square" (swapped), "+ big" (added), "- red" (removed), "a".
fn alignment_chip(ui: &mut egui::Ui, pair: &WordPair) {
    let visuals = ui.visuals();
    let (text, colour) = match pair.change {
        WordChange::Same => (pair.edit_text.clone(), visuals.weak_text_color()),
        WordChange::Swapped => (
            format!("{} -> {}", pair.source_text, pair.edit_text),
            visuals.strong_text_color(),
        ),
        WordChange::Added => (
            format!("+ {}", pair.edit_text),
            Color32::from_rgb(90, 200, 110),
        ),
        WordChange::Removed => (
            format!("- {}", pair.source_text),
            Color32::from_rgb(230, 100, 90),
        ),
    };
    let rich = egui::RichText::new(text);
    let rich = match pair.change {
        WordChange::Same => rich,
        WordChange::Removed => rich.color(colour).strikethrough(),
        _ => rich.color(colour).strong(),
    };
    ui.label(rich);
}
