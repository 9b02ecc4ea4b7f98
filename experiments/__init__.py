"""The experiments M1-M6 (docs/design.md#the-math-experiments), one script each (python experiments/<name>.py --help):

  m1_objectives.py       M1: every objective side by side from the same teacher and student
  m2_special_tokens.py   M2: a format token the teacher never saw, masked and hidden or not
  m3_opsd.py             M3: self-distillation with instance-specific PI vs a shared rule
  m4_rlvr_teacher.py     M4: the SFT teacher vs an RLVR-adapted teacher
  m5_cold_start.py       M5: OPD with and without the SFT cold start
  m6_on_policy.py        M6: teacher sequences, the student's own and a sparse reward at equal FLOPs (m6_report.py: its tables)
"""
