//! check
use crate::error::Result;
use crate::image::Image;
/// Report.
#[derive(Debug, Default)]
pub struct CheckReport {}
impl Image {
    pub(crate) async fn repair_refcounts(&self) -> Result<()> {
        Ok(())
    }
}
