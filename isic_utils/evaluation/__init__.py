"""What the runs are worth: failures, galleries, trust, external sets, adaptation, the options study, the comparison."""
