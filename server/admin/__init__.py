"""The adapter admin routes (`/v1/adapters`) and the journal that brings their changes back after a restart."""
