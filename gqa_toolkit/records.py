"""The keys under which each stage records what it did in an output's config.json: the conversion (source, method,
G, ...) and the uptraining (steps, tokens, data). A directory holding the conversion record is the toolkit's own
output, which is what lets `--force` replace it."""

CONVERSION_KEY = "gqa_conversion"
UPTRAINING_KEY = "gqa_uptraining"
