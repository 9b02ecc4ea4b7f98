"""Short demos the handouts run on the student's own code: each prints its table in a few seconds."""
