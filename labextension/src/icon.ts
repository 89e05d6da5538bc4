import { LabIcon } from '@jupyterlab/ui-components';

/** The capsem capsule (capsem_kernel/logo.py draws the same shape as PNG for the kernelspec). */
export const capsemIconSvg =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
  '<g transform="rotate(45 12 12)">' +
  '<path d="M5.52 7.2H12v9.6H5.52a4.8 4.8 0 0 1 0-9.6z" fill="#009688"/>' +
  '<path d="M12 7.2h6.48a4.8 4.8 0 0 1 0 9.6H12z" fill="#1a237e"/>' +
  '</g></svg>';

export const capsemIcon = new LabIcon({ name: 'capsem:capsule', svgstr: capsemIconSvg });
