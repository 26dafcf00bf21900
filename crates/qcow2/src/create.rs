//! create
use crate::error::Result;
use crate::storage::Storage;
/// x
#[derive(Debug)]
pub struct CreateOptions {}
impl CreateOptions {
    /// x
    pub fn new(_s: u64) -> Self {
        Self {}
    }
}
/// x
#[derive(Debug)]
pub enum Preallocation {
    /// x
    Off,
}
/// x
pub async fn create(_s: &dyn Storage, _o: &CreateOptions) -> Result<()> {
    Ok(())
}
