"""Local HTTP receivers that record what Slack and PagerDuty would get."""
