//! Worker events, routed once: each event goes to the one piece of state it belongs to. The edited
//! branch of the active edit goes to the edit mode; the source branch (a plain run or an edit's
//! source) to the run on screen, unless a newer request superseded its run; the other events to the
//! model, the probe, the Segments view or the status line.

use crate::ui::segments::SegmentsState;
use crate::ui::state::{AppState, StatusLevel};
use crate::worker::{Branch, Event};

/// What the app does after an event was routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AfterEvent {
    /// Nothing more.
    Nothing,
    /// Generate: the model a generation waited for has loaded.
    Generate,
    /// Load the bundled model: the model remembered from the last launch failed to load at start.
    LoadBundledModel,
}

/// Routes one worker event to the state it belongs to: the edited branch to the edit mode, the
/// source branch (a plain run or an edit's source) and everything else to the run on screen, the
/// probe, the Segments view or the status line.
pub(crate) fn route_event(
    state: &mut AppState,
    segments: &mut SegmentsState,
    event: Event,
) -> AfterEvent {
    if let Some(after) = crate::ui::image_input::image_event(state, &event) {
        return after;
    }
    let Some(event) = crate::ui::style_set::style_set_event(state, event) else {
        return AfterEvent::Nothing;
    };
    let edit = &mut state.modes.edit;
    match event {
        Event::Started {
            run_id,
            branch: Branch::Edited,
            params,
            prompt,
            edit: Some(info),
        } => {
            if edit.is_active_run(run_id) {
                state.edit_branch_started(run_id, params, prompt, info);
            }
        }
        Event::Step {
            run_id,
            branch: Branch::Edited,
            frame,
            blend_mask,
        } => {
            if edit.is_active_run(run_id) {
                edit.branch_step(*frame, blend_mask);
            }
        }
        Event::Finished {
            run_id,
            branch: Branch::Edited,
            image,
            elapsed_secs,
            blend_mask,
            ..
        } => {
            if edit.is_active_run(run_id) {
                edit.branch_finished(image, elapsed_secs, blend_mask, &mut state.status);
            }
        }
        Event::Cancelled { run_id, .. } if edit.branch_started(run_id) => {
            edit.branch_cancelled(&mut state.status);
            state.edit_branch_ended(run_id);
        }
        Event::Failed {
            run_id: Some(run_id),
            message,
        } if edit.branch_started(run_id) => {
            edit.branch_failed(&message, &mut state.status);
            state.edit_branch_ended(run_id);
        }
        event => {
            // An edit run that ends before its edited branch started (or after a newer run
            // superseded it) is no longer the edit's.
            if let Event::Cancelled { run_id, .. }
            | Event::Failed {
                run_id: Some(run_id),
                ..
            } = &event
            {
                edit.run_ended(*run_id);
            }
            return run_event(state, segments, event);
        }
    }
    AfterEvent::Nothing
}

/// The events of the run on screen (a plain run or an edit's source) and of everything else.
fn run_event(state: &mut AppState, segments: &mut SegmentsState, event: Event) -> AfterEvent {
    if let Some(run_id) = event.run_id() {
        let finishes = matches!(event, Event::Finished { .. });
        if !matches!(event, Event::Failed { .. }) && !state.is_current_run(run_id, finishes) {
            // A superseded run: its late events are dropped.
            return AfterEvent::Nothing;
        }
    }
    match event {
        Event::ModelLoaded { info } => {
            state.model_loaded(info);
            state.follow_edit_recommendation();
            if std::mem::take(&mut state.generate_after_load) {
                return AfterEvent::Generate;
            }
        }
        Event::ModelLoadFailed { source, message } => {
            if state.model_load_failed(&source, &message) {
                return AfterEvent::LoadBundledModel;
            }
        }
        Event::Started {
            run_id,
            branch: Branch::Source,
            params,
            prompt,
            ..
        } => {
            state.modes.edit.source_restarted(run_id);
            state.run_started(run_id, params, prompt);
        }
        Event::Step {
            branch: Branch::Source,
            frame,
            ..
        } => state.run_step(*frame),
        Event::Finished {
            branch: Branch::Source,
            image,
            elapsed_secs,
            self_attention_grids,
            ..
        } => state.finish_run(image, elapsed_secs, self_attention_grids),
        Event::Cancelled { run_id, steps_done } => state.run_cancelled(run_id, steps_done),
        Event::Failed { run_id, message } => state.run_failed(run_id, message),
        Event::Warning { message } => state.status.push(StatusLevel::Warning, message),
        Event::SelfAttention { run_id, map } => state.self_attention_arrived(run_id, map),
        // (An inversion request that is no longer the image's, or an appearance transfer that is
        // no longer the mode's: their late events are dropped.)
        Event::InversionProgress { .. } | Event::Inverted { .. } | Event::Appearance { .. } => {}
        Event::Exported { path } => {
            state
                .status
                .push(StatusLevel::Info, format!("Wrote {}", path.display()));
        }
        Event::ExportFailed { path, message } => state.status.push(
            StatusLevel::Error,
            format!("Could not write {}: {message}", path.display()),
        ),
        Event::Segmented {
            run_id,
            request,
            result,
            secs,
        } => {
            if let Err(message) = segments.segmented(run_id, request, result, secs) {
                state.status.push(
                    StatusLevel::Error,
                    format!("Segmentation failed: {message}"),
                );
            }
        }
        Event::WorkerRestarted { message } => {
            segments.worker_restarted();
            state.worker_restarted(&message);
        }
        // The edited branch of an edit that is no longer the active one (or an edited
        // `Started` without its alignment, which the worker never sends); a style set's images
        // (routed before).
        Event::Started {
            branch: Branch::Edited | Branch::StyleImage(_),
            ..
        }
        | Event::Step {
            branch: Branch::Edited | Branch::StyleImage(_),
            ..
        }
        | Event::Finished {
            branch: Branch::Edited | Branch::StyleImage(_),
            ..
        } => {}
    }
    AfterEvent::Nothing
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::alignment::EditKind;
    use crate::ui::mode::ModeKind;
    use crate::ui::run_view::{RunOutcome, RunView};
    use crate::worker::{
        EditInfo, EditSpec, GenerateParams, PromptInfo, RgbImage, StepCross, StepFrame, StepTiming,
    };

    /// An edit that superseded a run mid-way may reuse that run's finished source: the worker then
    /// reports the source finished (after the newer request went out) and the old edit cancelled.
    /// The source on screen must end finished with its image, whatever order those come in.
    #[test]
    fn a_superseded_runs_finished_source_stays_finished() {
        let mut state = AppState::default();
        let mut segments = SegmentsState::default();
        state.run = Some(RunView::new(
            2,
            Branch::Source,
            GenerateParams::default(),
            PromptInfo::default(),
        ));
        // The newer edit (run 3) went out; sending it marked the running source cancelled.
        state.pending_run = Some(3);
        if let Some(run) = state.run.as_mut() {
            run.outcome = RunOutcome::Cancelled { steps_done: 3 };
        }
        let image = RgbImage {
            width: 1,
            height: 1,
            pixels: vec![1, 2, 3],
        };
        route_event(
            &mut state,
            &mut segments,
            Event::Finished {
                run_id: 2,
                branch: Branch::Source,
                image: image.clone(),
                elapsed_secs: 0.5,
                self_attention_grids: Vec::new(),
                blend_mask: None,
            },
        );
        route_event(
            &mut state,
            &mut segments,
            Event::Cancelled {
                run_id: 2,
                steps_done: 3,
            },
        );
        let run = state.run.as_ref().unwrap();
        assert!(matches!(run.outcome, RunOutcome::Finished { .. }));
        assert_eq!(run.final_image, Some(image));
        assert_eq!(
            state.pending_run,
            Some(3),
            "the newer request is still awaited"
        );

        // A late event of some other, superseded run is still dropped.
        route_event(
            &mut state,
            &mut segments,
            Event::Finished {
                run_id: 1,
                branch: Branch::Source,
                image: RgbImage::default(),
                elapsed_secs: 0.1,
                self_attention_grids: Vec::new(),
                blend_mask: None,
            },
        );
        let run = state.run.as_ref().unwrap();
        assert_eq!(run.run_id, 2);
        assert_eq!(run.final_image.as_ref().unwrap().pixels, vec![1, 2, 3]);
    }

    fn frame(step_index: usize) -> Box<StepFrame> {
        Box::new(StepFrame {
            step_index,
            step_count: 2,
            timestep: 0.0,
            preview: RgbImage::default(),
            cross: std::sync::Arc::new(StepCross {
                step_index,
                groups: Vec::new(),
            }),
            timing: StepTiming::default(),
        })
    }

    fn edit_info() -> EditInfo {
        EditInfo {
            kind: EditKind::Replace,
            words: Vec::new(),
            source_reused: false,
            source_recordings: 1,
        }
    }

    /// Every event of one edit run, in the worker's order, lands once where it belongs: the source
    /// branch on the run on screen, the edited branch on the edit mode; nothing is left pending.
    #[test]
    fn an_edit_runs_two_branches_reach_the_run_and_the_edit() {
        let mut state = AppState::default();
        let mut segments = SegmentsState::default();
        state.modes.set_active(ModeKind::Edit);
        state.supersede_runs(1);
        state.modes.edit.sent(1, Some(EditSpec::new("a square")));
        let events = [
            Event::Started {
                run_id: 1,
                branch: Branch::Source,
                params: GenerateParams::default(),
                prompt: PromptInfo::default(),
                edit: None,
            },
            Event::Step {
                run_id: 1,
                branch: Branch::Source,
                frame: frame(0),
                blend_mask: None,
            },
            Event::Finished {
                run_id: 1,
                branch: Branch::Source,
                image: RgbImage::default(),
                elapsed_secs: 1.0,
                self_attention_grids: vec![(8, 8)],
                blend_mask: None,
            },
            Event::Started {
                run_id: 1,
                branch: Branch::Edited,
                params: GenerateParams::default(),
                prompt: PromptInfo::default(),
                edit: Some(edit_info()),
            },
            Event::Step {
                run_id: 1,
                branch: Branch::Edited,
                frame: frame(0),
                blend_mask: None,
            },
            Event::Step {
                run_id: 1,
                branch: Branch::Edited,
                frame: frame(1),
                blend_mask: None,
            },
            Event::Finished {
                run_id: 1,
                branch: Branch::Edited,
                image: RgbImage::default(),
                elapsed_secs: 1.0,
                self_attention_grids: Vec::new(),
                blend_mask: None,
            },
        ];
        for event in events {
            assert_eq!(
                route_event(&mut state, &mut segments, event),
                AfterEvent::Nothing
            );
        }
        let source = state.run.as_ref().unwrap();
        assert_eq!(source.steps.len(), 1);
        assert_eq!(source.self_attention_grids, vec![(8, 8)]);
        assert!(matches!(source.outcome, RunOutcome::Finished { .. }));
        let edited = state.modes.edit.run().unwrap();
        assert_eq!((edited.run_id, edited.branch), (1, Branch::Edited));
        assert_eq!(edited.steps.len(), 2);
        assert!(state.modes.edit.finished());
        assert!(!state.is_generating());
        assert_eq!(state.shown_run().unwrap().branch, Branch::Edited);
    }

    /// A newer run supersedes an edit: the old edit's edited events are dropped, and its end no
    /// longer counts as generating.
    #[test]
    fn a_superseded_edits_events_are_dropped() {
        let mut state = AppState::default();
        let mut segments = SegmentsState::default();
        state.modes.set_active(ModeKind::Edit);
        state.supersede_runs(1);
        state.modes.edit.sent(1, Some(EditSpec::new("a square")));
        // A plain run goes out (edit mode off); the edit's branch then reports late.
        state.modes.set_active(ModeKind::Plain);
        state.supersede_runs(2);
        route_event(
            &mut state,
            &mut segments,
            Event::Started {
                run_id: 1,
                branch: Branch::Edited,
                params: GenerateParams::default(),
                prompt: PromptInfo::default(),
                edit: Some(edit_info()),
            },
        );
        assert!(
            state.modes.edit.run().is_none(),
            "the superseded edit's branch is not shown"
        );
        route_event(
            &mut state,
            &mut segments,
            Event::Cancelled {
                run_id: 1,
                steps_done: 0,
            },
        );
        assert!(!state.modes.edit.is_running());
        assert_eq!(state.pending_run, Some(2), "the plain run is still awaited");
    }
}
