"""Tests of the dashboard and the alert rules shipped in the Helm chart's files/."""
