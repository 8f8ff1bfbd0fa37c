"""The report: figures and report.md from a sweep's results document."""
