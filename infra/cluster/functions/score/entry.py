"""Sluice function host entry, written by eventing.fn.env.write_entry_file.

Run: functions-framework --source entry.py --target handle --signature-type http --port $PORT
"""
import os

from eventing.fn.host import handler_from_env

handle = handler_from_env(os.environ)
