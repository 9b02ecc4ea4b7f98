"""The course kit: labs (handouts in labs/), make_lab.py, grade.py, the instructor's page README.md."""
