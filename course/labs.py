"""
The labs of the course: one registry that make_lab.py, grade.py and the kit's tests read.

A lab names the code a student writes by a tag: in the library, the lines between

    # lab:<name> begin
    # lab:<name> end

(inside a function, at the indentation of its body) are what the student copy replaces by
`raise NotImplementedError(...)`. The library itself stays the reference solution.

A lab's graded tests are pytest node ids, grouped into tasks; an id without `[...]` stands for
every parametrised case of that test. A lab's graded tests must call its marked code and no
other lab's (tests/test_course.py checks both on a fresh copy of every lab).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str                # short, one word: printed by the grader as `name: passed/total`
    checks: str              # one line: what the task's tests prove
    tests: tuple[str, ...]   # pytest node ids, relative to the project root


@dataclass(frozen=True)
class Lab:
    name: str                # the marker tag and the command-line name
    title: str
    handout: str             # markdown file, relative to the project root
    tasks: tuple[Task, ...]

    @property
    def tests(self) -> tuple[str, ...]:
        return tuple(t for task in self.tasks for t in task.tests)


G = "tests/test_course_graders.py::"

LABS = (
    Lab("kv_cache", "The KV-cached rollout: cached = recomputed", "course/labs/01_kv_cache.md", (
        Task("write", "KVCache.write stores keys and values at [length, length+T) and returns all so far",
             (G + "test_kv_cache_allocates_one_buffer_per_tensor_for_every_layer",
              G + "test_kv_cache_write_returns_the_cached_keys_then_the_new_ones",
              G + "test_kv_cache_keeps_the_layers_apart")),
        Task("decode", "the GPT decoding with the cache gives the logits of a full recomputation",
             ("tests/test_model.py::test_cached_logits_equal_full_recomputation_over_a_generation",)),
        Task("rollout", "cached sampling gives the same rollout as recomputing every prefix",
             ("tests/test_rollout.py::test_cache_and_recompute_give_the_same_rollout",
              "tests/test_rollout.py::test_greedy_batched_ragged_equals_one_prompt_at_a_time")),
    )),
    Lab("g_gamma", "Sampled-token OPD and g_gamma, exact; the toy's bias/variance table",
        "course/labs/02_g_gamma.md", (
        Task("returns", "returns_to_go: R_t = sum_{t'>=t} gamma^(t'-t) r_t' over the mask",
             (G + "test_returns_to_go_is_the_discounted_sum_of_the_costs_from_t_on",)),
        Task("g_gamma", "g_gamma_surrogate: its gradient is g_gamma; gamma = 1 is grad J exactly",
             (G + "test_g_gamma_cost_is_student_minus_teacher",
              G + "test_g_gamma_treats_the_teacher_as_a_constant",
              "tests/test_objectives_gamma.py::test_gamma_1_is_exactly_the_gradient_of_the_sequence_kl",
              "tests/test_objectives_gamma.py::test_gamma_0_is_biased_on_a_coupled_policy",
              "tests/test_objectives_gamma.py::test_every_gamma_is_unbiased_when_future_costs_do_not_depend_on_the_current_token")),
        Task("sampled", "sampled_token_surrogate: unbiased for the token-level KL, clamp, vOPD baseline",
             ("tests/test_objectives_gamma.py::test_gamma_0_on_logits_is_sampled_token_opd",
              "tests/test_objectives_gamma.py::test_sampled_token_with_and_without_baseline_is_unbiased_for_the_token_kl",
              "tests/test_objectives_gamma.py::test_vopd_baseline_lowers_the_variance",
              "tests/test_objectives_gamma.py::test_clamp_clips_the_cost_on_the_sampled_token",
              G + "test_sampled_token_clamps_the_cost_before_the_baseline")),
        Task("toy", "the exact toy, run on your code: bias 0 at gamma = 1 and at coupling 0; variance rises",
             ("tests/test_toy.py::test_bias_vanishes_at_gamma_one_and_at_zero_coupling",
              "tests/test_toy.py::test_bias_and_variance_shape",
              "tests/test_toy.py::test_exact_quantities_match_monte_carlo")),
    )),
    Lab("topk", "Top-K support matching, and why the unnormalised form drains mass (M1)",
        "course/labs/03_topk.md", (
        Task("unnormalized", "sum_S pi (log pi - log q): keeps the +1 term, drains mass to q/e on S",
             (G + "test_topk_unnormalized_keeps_its_plus_one_term",
              G + "test_topk_unnormalized_gradient_is_the_truncated_one_plus_the_mass_term",
              G + "test_topk_unnormalized_step_drains_mass_out_of_the_support",
              "tests/test_objectives_topk.py::test_unnormalized_settles_with_a_third_of_the_teachers_mass_on_the_support")),
        Task("stopgrad", "sum_S pi (sg(log pi) - log q): the full reverse-KL gradient truncated to S",
             (G + "test_topk_stopgrad_has_no_plus_one_term",
              "tests/test_objectives_topk.py::test_stopgrad_gradient_is_the_full_gradient_restricted_to_the_support",
              "tests/test_objectives_topk.py::test_stopgrad_pushes_up_every_token_outside_the_support")),
        Task("renorm", "KL(pi_hat || q_hat) on S, both renormalised on S, empty S gives 0",
             (G + "test_topk_renormalized_is_the_reverse_kl_of_the_renormalised_pair",
              "tests/test_objectives_topk.py::test_renormalized_is_the_kl_of_the_renormalized_distributions")),
        Task("all", "every form treats the teacher as a constant; K = V gives the full reverse KL",
             (G + "test_topk_forms_treat_the_teacher_as_a_constant",
              "tests/test_objectives_topk.py::test_k_equal_to_vocabulary_is_the_full_reverse_kl")),
    )),
    Lab("masking", "Special-token masking and hiding (M2)", "course/labs/04_masking.md", (
        Task("mask", "mask_tokens removes exactly the positions that hold a listed token",
             (G + "test_mask_tokens_tames_a_token_the_teacher_never_saw",
              "tests/test_objectives.py::test_mask_tokens_removes_those_positions[full_reverse_kl-{}]",
              "tests/test_objectives.py::test_mask_tokens_removes_those_positions[jsd-{'beta': 0.3}]",
              "tests/test_objectives.py::test_mask_tokens_removes_those_positions[jsd-{'beta': 0.0}]")),
        Task("hide", "HiddenTokens: the teacher scores every other token as if the hidden ones were not there",
             (G + "test_hidden_tokens_leave_the_prompt_alone",
              G + "test_hidden_tokens_in_a_ragged_batch_are_as_if_they_were_not_there",
              "tests/test_opd.py::test_a_token_hidden_from_the_teacher_is_as_if_it_were_not_there")),
    )),
    Lab("opsd", "Self-distillation with privileged information: instance-specific PI vs a shared rule (M3)",
        "course/labs/05_opsd.md", (
        Task("pi_text", "pi_text: the answer, the solution, or one rule shared by every problem",
             (G + "test_pi_text_instance_specific_vs_shared",
              "tests/test_self_distill.py::test_sft_mixture_examples")),
        Task("context", "with_privileged_context: [bos] PI x y for the teacher, the student's rollout untouched",
             (G + "test_privileged_context_is_bos_pi_prompt_then_the_same_response",
              G + "test_privileged_teacher_scores_equal_a_manual_pass_on_the_concatenation",
              G + "test_privileged_information_never_reaches_the_students_rollout")),
    )),
    Lab("rlvr", "The RLVR-adapted teacher and the cold start (M4, M5)", "course/labs/06_rlvr.md", (
        Task("advantages", "group_advantages: (R - mean) / (std + eps) per group, 0 for a group of equal rewards",
             (G + "test_group_advantages_by_hand",
              "tests/test_rlvr.py::test_advantages_are_normalised_per_group",
              "tests/test_rlvr.py::test_identical_rewards_give_exactly_zero_advantage_never_nan")),
        Task("loss", "policy_gradient_loss: -sum A log pi over the response tokens / their number",
             (G + "test_policy_gradient_loss_is_per_token",
              "tests/test_rlvr.py::test_policy_gradient_loss_is_the_token_mean_of_minus_a_logp")),
        Task("cold_start", "sft.make_batch: next-token targets on the response only; a tiny SFT learns",
             (G + "test_sft_batch_targets_are_the_next_response_tokens",
              "tests/test_sft_checkpoint.py::test_batch_targets_cover_exactly_the_response",
              "tests/test_sft_checkpoint.py::test_tiny_sft_lowers_the_loss")),
    )),
    Lab("audit", "The estimator audit: which divergence does an estimator follow?", "course/labs/07_audit.md", (
        Task("enumerate", "per_sample_grads and expectation: every grad L(y), then g_L and tr Cov, exactly",
             (G + "test_audit_per_sample_grads_are_the_gradients_of_each_sequence_alone",
              G + "test_audit_per_sample_grads_of_a_loss_without_a_graph_are_zero",
              G + "test_audit_expectation_is_the_pi_weighted_mean_and_trace_covariance")),
        Task("targets", "token_divergence: the reverse and forward KL at the visited prefixes, pi(y) held fixed",
             (G + "test_audit_token_divergences_are_the_reverse_and_forward_kl_at_visited_prefixes",)),
        Task("follows", "follows: 'X exactly' by relative error, '~X' by cosine, ties named, else 'none'",
             (G + "test_audit_follows_names_the_target_an_estimator_follows",)),
        Task("mystery", "the three together: an unknown estimator, k2 and k3 identified",
             (G + "test_audit_finds_what_an_unknown_estimator_follows",)),
    )),
    Lab("on_policy", "Why on-policy: the lambda-mixed batch and the FLOP count", "course/labs/08_on_policy.md", (
        Task("count", "forward_flops: F(T, h) = 24 L C^2 T + 2 L C T(T+1) + 2 C V h, causal, the head at h positions",
             (G + "test_forward_flops_counts_each_term",
              "tests/test_flops.py::test_forward_flops_equals_a_hand_count_on_a_tiny_config",
              "tests/test_flops.py::test_the_projections_and_the_head_match_torchs_flop_counter",
              "tests/test_flops.py::test_scoring_a_rollout_counts_the_head_only_where_it_is_read")),
        Task("step", "opd_step_flops and FlopCount.add: sampling, scoring, 3 F to train; charged vs given",
             (G + "test_opd_step_flops_charges_every_pass_once",
              G + "test_flop_count_given_leaves_out_the_teachers_sampling",
              "tests/test_flops.py::test_an_opd_step_is_sampling_scoring_and_three_student_passes",
              "tests/test_flops.py::test_flop_count_keeps_both_columns")),
        Task("share", "student_share: S = round(lmbda B), the nearest whole row, halves to even",
             ("tests/test_mixed_batch.py::test_student_share_rounds_lmbda_times_the_batch",
              "tests/test_mixed_batch.py::test_student_share_rounds_to_the_nearest_row_halves_to_even")),
        Task("merge", "merge: one batch, prompts left-padded to P, responses right-padded to N, rows in order",
             ("tests/test_mixed_batch.py::test_merge_left_pads_the_prompts_and_right_pads_the_responses",)),
    )),
    Lab("cross_tokenizer", "A teacher that reads another tokenizer: the alignment and the chunk log-ratio (M7)",
        "course/labs/09_cross_tokenizer.md", (
        Task("align", "align: groups that close where both tokenizations end, a partition of both",
             (G + "test_align_closes_a_group_only_where_both_tokenizations_end",
              "tests/test_cross_tokenizer.py::test_groups_partition_both_tokenizations_into_equal_byte_spans",
              "tests/test_cross_tokenizer.py::test_digits_against_multi_digit_tokens")),
        Task("chunk", "chunk_logratios: r_c = L_S(c) - L_T(c), summing to the paths' log-ratio, spread over n_c",
             (G + "test_chunk_logratios_are_the_students_minus_the_teachers_spread_over_the_students_pieces",
              "tests/test_cross_tokenizer.py::test_one_tokenizer_on_both_sides_gives_the_token_logratios_to_the_bit",
              "tests/test_cross_tokenizer.py::test_chunk_logratios_sum_to_the_path_logratio_and_spread_exactly")),
        Task("costs", "chunk_costs: r_c / n_c on each token, or r_c after its chunk; on a real teacher's split",
             (G + "test_chunk_costs_spread_a_chunk_or_place_it_after_the_chunk",
              "tests/test_cross_teacher.py::test_chunk_costs_sum_to_the_token_paths_logratio")),
    )),
)


def get_lab(name: str) -> Lab:
    """The lab called `name`; ValueError with the valid names otherwise."""
    for lab in LABS:
        if lab.name == name:
            return lab
    raise ValueError(f"unknown lab {name!r}; the labs are: {', '.join(lab.name for lab in LABS)} "
                     f"(python course/make_lab.py --list)")
