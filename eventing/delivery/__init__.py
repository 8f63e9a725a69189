"""Sluice's local KafkaSource: dispatcher, invokers, and the commit order."""
