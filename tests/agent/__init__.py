"""Tests of myx_agent: config, dispatcher, HTTP surface, real agent processes."""
