"""CloudEvents on the wire: the only package that knows header names and the batch format.

`event` (attributes, validation, value formats), `json` (the JSON event format), `kafka`
and `http` (the protocol bindings, with Sluice's fast paths). Imported as modules:
`from eventing.cloudevent import kafka as ce_kafka`.
"""
