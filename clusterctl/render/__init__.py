"""What users see: consoles and JSON (output), units (units), the status table, the live view, plan,
estimate, report and profile views, and PNG plots. Data in, text or images out; no registry, no
scheduler."""
