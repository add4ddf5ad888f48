//! Step windows of cross-attention summed in constant time: running (prefix) sums of every step's
//! maps, so that the heat maps of any window `first..=last` cost one step's aggregation instead of
//! `last - first + 1`, however long the run.
//!
//! Aggregating a summed step equals aggregating the steps themselves because every step has the
//! same groups with the same layer counts (checked by [`same_groups`]; sums stop otherwise).

use std::borrow::{Borrow, Cow};

use crate::analysis::heatmap::{CrossGroup, StepCross};

/// Running sums of a run's steps: entry `k - 1` holds, per group, the sum of the maps of steps
/// `0..=k` (step 0's sum is step 0 itself and is not copied). `None` once a step's groups differ
/// from the first step's (no engine does that; the window is then aggregated step by step).
#[derive(Clone, Debug)]
pub struct CrossPrefixSums {
    sums: Option<Vec<StepCross>>,
}

impl Default for CrossPrefixSums {
    fn default() -> Self {
        Self {
            sums: Some(Vec::new()),
        }
    }
}

impl CrossPrefixSums {
    /// Empty sums with room for `step_count` steps.
    pub fn with_capacity(step_count: usize) -> Self {
        Self {
            sums: Some(Vec::with_capacity(step_count.saturating_sub(1))),
        }
    }

    /// Extends the sums by the last step of `steps` (call once after each step is appended; the
    /// steps arrive in order). `steps` may hold the steps or shared pointers to them.
    pub fn push_last<S: Borrow<StepCross>>(&mut self, steps: &[S]) {
        let Some(sums) = &mut self.sums else {
            return;
        };
        let Some((step, earlier)) = steps.split_last() else {
            return;
        };
        let step = step.borrow();
        let Some(previous) = sums.last().or(earlier.first().map(Borrow::borrow)) else {
            // The first step: its own sum.
            return;
        };
        if sums.len() + 1 != earlier.len() || !same_groups(previous, step) {
            self.sums = None;
            return;
        }
        let next = StepCross {
            step_index: step.step_index,
            groups: previous
                .groups
                .iter()
                .zip(&step.groups)
                .map(|(sum, group)| combine(sum, group, |a, b| a + b))
                .collect(),
        };
        sums.push(next);
    }

    /// True while every step could be summed.
    pub fn is_summable(&self) -> bool {
        self.sums.is_some()
    }

    /// The sum of `steps[..=last]` (borrowed: no copy).
    fn prefix<'a, S: Borrow<StepCross>>(
        &'a self,
        steps: &'a [S],
        last: usize,
    ) -> Option<&'a StepCross> {
        if last == 0 {
            return steps.first().map(Borrow::borrow);
        }
        self.sums.as_ref()?.get(last - 1)
    }

    /// The cross-attention of steps `first..=last` summed into one step. Borrowed when the window
    /// is one step or starts at step 0; otherwise the difference of two running sums (one new step).
    /// `None` when the window is empty, out of range or the steps are not summable.
    pub fn window<'a, S: Borrow<StepCross>>(
        &'a self,
        steps: &'a [S],
        first: usize,
        last: usize,
    ) -> Option<Cow<'a, StepCross>> {
        if first > last || last >= steps.len() {
            return None;
        }
        if first == last {
            return steps.get(first).map(|step| Cow::Borrowed(step.borrow()));
        }
        let upper = self.prefix(steps, last)?;
        let Some(lower_index) = first.checked_sub(1) else {
            return Some(Cow::Borrowed(upper));
        };
        let lower = self.prefix(steps, lower_index)?;
        Some(Cow::Owned(StepCross {
            step_index: last,
            groups: upper
                .groups
                .iter()
                .zip(&lower.groups)
                .map(|(upper, lower)| combine(upper, lower, |a, b| a - b))
                .collect(),
        }))
    }
}

/// `group` with its data replaced by `op(a, b)` element-wise over `a`'s and `b`'s data.
fn combine(a: &CrossGroup, b: &CrossGroup, op: impl Fn(f32, f32) -> f32) -> CrossGroup {
    CrossGroup {
        place: b.place,
        h: b.h,
        w: b.w,
        layer_count: b.layer_count,
        token_count: b.token_count,
        data: a
            .data
            .iter()
            .zip(&b.data)
            .map(|(&x, &y)| op(x, y))
            .collect(),
    }
}

/// True when two steps have the same groups in the same order (so their maps can be added).
pub fn same_groups(a: &StepCross, b: &StepCross) -> bool {
    a.groups.len() == b.groups.len()
        && a.groups.iter().zip(&b.groups).all(|(a, b)| {
            (
                a.place,
                a.h,
                a.w,
                a.layer_count,
                a.token_count,
                a.data.len(),
            ) == (
                b.place,
                b.h,
                b.w,
                b.layer_count,
                b.token_count,
                b.data.len(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::heatmap::{word_heatmaps, AggregationSettings, UnetPlace};
    use crate::analysis::WordSpan;

    fn step(step_index: usize) -> StepCross {
        let groups = [(UnetPlace::Down, 8, 2), (UnetPlace::Up, 4, 3)]
            .iter()
            .map(|&(place, side, layer_count)| CrossGroup {
                place,
                h: side,
                w: side,
                layer_count,
                token_count: 4,
                data: (0..4 * side * side)
                    .map(|index| ((index * 7 + step_index * 13) % 17) as f32 / 17.0)
                    .collect(),
            })
            .collect();
        StepCross { step_index, groups }
    }

    fn run(step_count: usize) -> (Vec<StepCross>, CrossPrefixSums) {
        let mut steps = Vec::new();
        let mut sums = CrossPrefixSums::with_capacity(step_count);
        for index in 0..step_count {
            steps.push(step(index));
            sums.push_last(&steps);
        }
        (steps, sums)
    }

    #[test]
    fn summed_windows_aggregate_like_the_steps_themselves() {
        let (steps, sums) = run(6);
        let words = [WordSpan {
            text: "w".to_owned(),
            token_indices: vec![1, 2],
        }];
        for (first, last) in [(0, 5), (2, 4), (3, 3), (0, 0), (1, 5)] {
            let settings = AggregationSettings {
                steps: first..=last,
                ..AggregationSettings::default()
            };
            let direct = word_heatmaps(&steps, &words, &settings, 8, 8);
            let summed = sums.window(&steps, first, last).unwrap().into_owned();
            let fast = word_heatmaps(&[summed], &words, &AggregationSettings::default(), 8, 8);
            let max_diff = direct[0]
                .data
                .iter()
                .zip(&fast[0].data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(max_diff < 1e-5, "{first}..={last}: {max_diff}");
            assert!((direct[0].peak - fast[0].peak).abs() < 1e-4);
        }
    }

    #[test]
    fn windows_from_the_first_step_or_of_one_step_are_borrowed() {
        let (steps, sums) = run(4);
        assert!(matches!(sums.window(&steps, 0, 3), Some(Cow::Borrowed(_))));
        assert!(matches!(sums.window(&steps, 2, 2), Some(Cow::Borrowed(_))));
        assert!(matches!(sums.window(&steps, 1, 3), Some(Cow::Owned(_))));
        assert!(sums.window(&steps, 3, 1).is_none(), "an empty window");
        assert!(sums.window(&steps, 0, 4).is_none(), "past the last step");
    }

    #[test]
    fn a_step_with_other_groups_stops_the_sums() {
        let (mut steps, mut sums) = run(2);
        let mut odd = step(2);
        odd.groups.pop();
        steps.push(odd);
        sums.push_last(&steps);
        assert!(!sums.is_summable());
        assert!(sums.window(&steps, 0, 2).is_none());
        assert!(
            sums.window(&steps, 1, 1).is_some(),
            "one step needs no sums"
        );
    }
}
