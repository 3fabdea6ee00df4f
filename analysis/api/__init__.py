"""REST API of the analysis app: experiment results, webhooks and test alerts."""
