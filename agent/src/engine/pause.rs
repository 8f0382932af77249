//! Unpausing: the one way out of `paused` (start refuses a paused container).

use super::{Engine, Result};

impl Engine {
    pub async fn unpause(&self, name: &str) -> Result<()> {
        self.docker
            .unpause_container(name)
            .await
            .map_err(self.classify(|| format!("container {name}")))
    }
}
