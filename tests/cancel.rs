//! Cancellation reaches inside a UNet call: every hooked attention layer checks the run's token, so
//! a run cancelled in the middle of a step stops at the next layer instead of finishing the step.

mod common;
use common::fixture;

use attend::hook::{AttentionProcessor, AttentionSite, CancelToken};
use attend::pipeline::model::{LoadOptions, StableDiffusion};
use attend::pipeline::sampling::{generate, GenerateRequest};
use attend::pipeline::PipelineError;
use candle_core::Tensor;

/// Trips the token at its `trip_at`-th call and counts the calls that come after it.
struct TripsMidStep {
    token: CancelToken,
    trip_at: usize,
    calls: usize,
    calls_after_trip: usize,
}

impl AttentionProcessor for TripsMidStep {
    fn process_probabilities(
        &mut self,
        _site: &AttentionSite,
        _probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.token.is_cancelled() {
            self.calls_after_trip += 1;
        }
        self.calls += 1;
        if self.calls == self.trip_at {
            self.token.cancel();
        }
        Ok(None)
    }
}

#[test]
fn a_run_cancelled_inside_a_step_stops_at_the_next_attention_layer() {
    let model = StableDiffusion::load(&fixture("tiny-sd1"), &LoadOptions::default()).unwrap();
    let mut request = GenerateRequest::new(&model, "a photo of a cat");
    request.steps = 3;
    let token = CancelToken::new();
    // tiny-sd1 has 22 attention layers per UNet call: trip the token at the fifth, in step 0.
    let mut processor = TripsMidStep {
        token: token.clone(),
        trip_at: 5,
        calls: 0,
        calls_after_trip: 0,
    };
    let mut steps_reported = 0;
    let result = generate(
        &model,
        &request,
        Some(&mut processor),
        &mut |_| {
            steps_reported += 1;
            Ok(())
        },
        &token,
    );
    assert!(
        matches!(result, Err(PipelineError::Cancelled)),
        "expected a cancelled run, got {:?}",
        result.map(|output| output.timesteps)
    );
    assert_eq!(processor.calls, 5, "no attention layer ran after the trip");
    assert_eq!(processor.calls_after_trip, 0);
    assert_eq!(
        steps_reported, 0,
        "the step in which the run was cancelled is not reported"
    );
}

#[test]
fn an_untripped_token_lets_every_layer_run() {
    let model = StableDiffusion::load(&fixture("tiny-sd1"), &LoadOptions::default()).unwrap();
    let mut request = GenerateRequest::new(&model, "a photo of a cat");
    request.steps = 2;
    let token = CancelToken::new();
    let mut processor = TripsMidStep {
        token: token.clone(),
        trip_at: usize::MAX,
        calls: 0,
        calls_after_trip: 0,
    };
    let output = generate(
        &model,
        &request,
        Some(&mut processor),
        &mut |_| Ok(()),
        &token,
    );
    assert!(output.is_ok(), "{:?}", output.err());
    assert_eq!(processor.calls, 2 * 22);
}
