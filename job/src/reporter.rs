//! The [`Reporter`] interface: what hears the engine's reports (lifecycle changes) and
//! tells the outside world.

use async_trait::async_trait;
use kiln_model::Report;

/// Tells the outside world about an event. An `Err` (or a panic) means "not delivered":
/// the event is tried again later.
#[async_trait]
pub trait Reporter: Send + Sync + 'static {
    /// Delivers one event.
    async fn report(&self, event: &Report) -> Result<(), String>;
}
