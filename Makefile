# The two commands of the README. Both install what they need first (idempotent).
.PHONY: up test down status bootstrap lint

bootstrap:
	@bash infra/local/bootstrap.sh

# Start the local stack and the example pipeline.
up: bootstrap
	.venv/bin/sluice up $(ARGS)

# Run the whole test suite; it starts its own stack on shifted ports and stops it.
test: bootstrap
	.venv/bin/ruff check eventing functions examples tests benchmarks
	.venv/bin/python -m pytest $(ARGS)

down:
	.venv/bin/sluice down $(ARGS)

status:
	.venv/bin/sluice status $(ARGS)
