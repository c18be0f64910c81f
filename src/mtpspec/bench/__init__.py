"""`mtpspec bench`: the same prompts through the baseline and each method in one run, with speed
ratios, acceptance statistics, a losslessness check, a report and plots."""
