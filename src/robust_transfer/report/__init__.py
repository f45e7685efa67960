"""Reports of a study: findings, tables and figures, as Markdown and HTML."""
