"""Capture: microphone or file -> journal -> encoded chunks in the spool."""
